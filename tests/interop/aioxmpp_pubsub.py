#!/usr/bin/python3
"""aioxmpp interop, XEP-0060 through aioxmpp's PubSubClient: the life of an IODEF
topic on the broker, as a second library sees it.

An owner (--owner) creates a topic with a node_config form, reads and changes its
configuration with aioxmpp's NodeConfigForm; a subscriber (--subscriber) discovers
it with aioxmpp's DiscoClient, subscribes, receives the IODEF 2.0 documents the
owner publishes (as a registered aioxmpp payload class), retrieves items (all,
max_items, by id, and paged with XEP-0059 using aioxmpp's RSM XSO), and sees
retract, purge and delete notifications.

aioxmpp's PubSubClient has no create-with-configuration and no RSM on item
retrieval, so those two requests are built from aioxmpp's own XSOs (pubsub
Request + Configure; rsm ResultSetMetadata) and sent with client.send.

Prints one line per check ("ok"/"FAIL"); exit 0 only if every check passed, 1
otherwise, 2 on timeout.
"""
import argparse
import asyncio
import copy
import xml.etree.ElementTree as ET

import aioxmpp
import aioxmpp.connector
import aioxmpp.disco
import aioxmpp.forms
import aioxmpp.pubsub
import aioxmpp.pubsub.xso as pubsub_xso
import aioxmpp.rsm.xso as rsm_xso
import aioxmpp.security_layer
import aioxmpp.service
import aioxmpp.xml
import aioxmpp.xso as xso
import lxml.etree

import iodefdoc
from pubsubcheck import Checks, Fatal, Inbox, run_script

META_DATA = "http://jabber.org/protocol/pubsub#meta-data"


@pubsub_xso.as_payload_class
class IodefDocument(xso.XSO):
    """An IODEF 2.0 document as an aioxmpp payload: the root's attributes, and its
    children kept as lxml trees (aioxmpp's Collector)."""
    TAG = (iodefdoc.IODEF_NS, "IODEF-Document")
    version = xso.Attr("version", default=None)
    lang = xso.LangAttr()
    content = xso.Collector()

    @classmethod
    def from_sample(cls, incident_id):
        et = iodefdoc.document(incident_id)
        root = lxml.etree.fromstring(ET.tostring(et))
        doc = cls()
        doc.version = root.get("version")
        doc.lang = aioxmpp.structs.LanguageTag.fromstr(root.get("{http://www.w3.org/XML/1998/namespace}lang"))
        for child in root:
            doc.content.append(copy.deepcopy(child))
        return doc, et

    def as_etree(self):
        return ET.fromstring(aioxmpp.xml.serialize_single_xso(self))


# XEP-0060 §6.5.4 puts the RSM <set/> next to <items/> in <pubsub/>; aioxmpp's
# Request has no slot for it, so one is declared (aioxmpp XSOs allow that).
pubsub_xso.Request.rsm = xso.Child([rsm_xso.ResultSetMetadata])


class EventTap(aioxmpp.service.Service):
    """Sees every pubsub event before PubSubClient, which swallows purge events
    without a signal."""
    ORDER_BEFORE = [aioxmpp.PubSubClient]
    inbox = None

    def derive_logger(self, logger):
        # The default assumes a class inside the aioxmpp package.
        return logger.getChild("EventTap")

    @aioxmpp.service.inbound_message_filter
    def tap(self, msg):
        ev = msg.xep0060_event
        if ev is not None and isinstance(ev.payload, pubsub_xso.EventPurge) and self.inbox is not None:
            self.inbox.put("purge", ev.payload.node)
        return msg


def parse():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True, help="grid CA certificate (PEM)")
    p.add_argument("--owner", required=True)
    p.add_argument("--subscriber", required=True)
    p.add_argument("--password", required=True, help="both platforms' password")
    p.add_argument("--broker", default="broker.grid.test")
    p.add_argument("--node", default="aioxmpp-iodef")
    p.add_argument("--timeout", type=float, default=40.0)
    p.add_argument("--step-timeout", type=float, default=5.0)
    p.add_argument("--debug", action="store_true")
    return p.parse_args()


def make_client(args, jid):
    def ssl_context():
        ctx = aioxmpp.security_layer.default_ssl_context()
        ctx.load_verify_locations(args.ca)
        return ctx
    security = aioxmpp.make_security_layer(args.password, ssl_context_factory=ssl_context)
    return aioxmpp.Client(aioxmpp.JID.fromstr(jid), security,
                          override_peer=[(args.host, args.port, aioxmpp.connector.STARTTLSConnector())])


def err(e):
    if isinstance(e, aioxmpp.errors.XMPPError):
        return f"{e.condition} {e.text or ''}".strip()
    return repr(e)


def values(form):
    """{var: [values]} of an aioxmpp Data form."""
    return {f.var: list(f.values) for f in form.fields}


async def run(args):
    c = Checks()
    owner = make_client(args, args.owner)
    sub = make_client(args, args.subscriber)
    inbox = Inbox()
    ps_o = owner.summon(aioxmpp.PubSubClient)
    ps_s = sub.summon(aioxmpp.PubSubClient)
    tap = sub.summon(EventTap)
    tap.inbox = inbox
    ps_s.on_item_published.connect(lambda jid, node, item, message=None: inbox.put("publish", (jid, node, item, message)))
    ps_s.on_item_retracted.connect(lambda jid, node, id_, message=None: inbox.put("retract", (jid, node, id_)))
    ps_s.on_node_deleted.connect(lambda jid, node, redirect_uri=None, message=None: inbox.put("delete", (jid, node)))

    async with owner.connected(), sub.connected(presence=aioxmpp.PresenceState(True)):
        print(f"logged in as {owner.local_jid} and {sub.local_jid}", flush=True)
        try:
            await flow(c, args, owner, sub, ps_o, ps_s, inbox)
        except Fatal as e:
            c.check(False, "flow stopped", str(e))
        leftovers = [k for k, _ in inbox.unconsumed()]
        c.check(not leftovers, "no unexpected notifications", str(leftovers))
    return c.code()


async def flow(c, args, owner, sub, ps_o, ps_s, inbox):
    T = args.step_timeout
    broker = aioxmpp.JID.fromstr(args.broker)
    node = args.node

    async def send(client, iq):
        return await asyncio.wait_for(client.send(iq), T)

    features = await asyncio.wait_for(ps_s.get_features(broker), T)
    F = pubsub_xso.Feature
    want = {F.CREATE_NODES, F.CREATE_AND_CONFIGURE, F.CONFIG_NODE, F.PUBLISH, F.SUBSCRIBE, F.RETRIEVE_ITEMS,
            F.RETRACT_ITEMS, F.PURGE_NODES, F.DELETE_NODES, F.META_DATA}
    c.check(want <= features, "broker disco#info announces the features used here", str(sorted(f.name for f in want - features)))

    # ---- create with a configuration form (§8.1.2), from aioxmpp's XSOs ----
    form = aioxmpp.forms.Data(aioxmpp.forms.DataType.SUBMIT)
    for var, value, type_ in [("FORM_TYPE", pubsub_xso.NodeConfigForm.FORM_TYPE, aioxmpp.forms.FieldType.HIDDEN),
                              ("pubsub#type", iodefdoc.IODEF_NS, aioxmpp.forms.FieldType.TEXT_SINGLE),
                              ("pubsub#title", "IODEF incidents (aioxmpp)", aioxmpp.forms.FieldType.TEXT_SINGLE),
                              ("pubsub#access_model", "open", aioxmpp.forms.FieldType.LIST_SINGLE)]:
        form.fields.append(aioxmpp.forms.Field(var=var, values=[value], type_=type_))
    req = pubsub_xso.Request(pubsub_xso.Create())
    req.payload.node = node
    req.configure = pubsub_xso.Configure()
    req.configure.data = form
    try:
        r = await send(owner, aioxmpp.IQ(to=broker, type_=aioxmpp.IQType.SET, payload=req))
        created = r.payload.node if r is not None and r.payload is not None else node
        c.check(created == node, "owner creates the node with a node_config form", repr(created))
    except aioxmpp.errors.XMPPError as e:
        raise Fatal(f"create: {err(e)}")

    # ---- configuration through NodeConfigForm (§8.2) ----
    try:
        data = await asyncio.wait_for(ps_o.get_node_config(broker, node), T)
        cfg = pubsub_xso.NodeConfigForm.from_xso(data)
        c.check(cfg.type.value == iodefdoc.IODEF_NS,
                "configure get: pubsub#type is IODEF 2.0", str(values(data).get("pubsub#type")))
        c.check(cfg.title.value == "IODEF incidents (aioxmpp)", "configure get: title", repr(cfg.title.value))
        c.check(cfg.access_model.value == "open", "configure get: access_model open", repr(cfg.access_model.value))
        cfg.title.value = "IODEF incidents"
        cfg.max_items.value = "50"
        await asyncio.wait_for(ps_o.set_node_config(broker, cfg.render_reply(), node), T)
        again = values(await asyncio.wait_for(ps_o.get_node_config(broker, node), T))
        c.check(again.get("pubsub#title") == ["IODEF incidents"] and again.get("pubsub#max_items") == ["50"]
                and again.get("pubsub#type") == [iodefdoc.IODEF_NS] and again.get("pubsub#access_model") == ["open"],
                "configure set (the form as received, two values changed): applied, the rest kept",
                f"title={again.get('pubsub#title')} max_items={again.get('pubsub#max_items')} "
                f"type={again.get('pubsub#type')} access={again.get('pubsub#access_model')}")
    except (aioxmpp.errors.XMPPError, asyncio.TimeoutError) as e:
        c.check(False, "configure get/set", err(e))

    # ---- discovery with DiscoClient (§5.2 – §5.4) ----
    disco = sub.summon(aioxmpp.DiscoClient)
    # aioxmpp's Feature enumeration has no pubsub#rsm (XEP-0060 §6.5.4): asked directly.
    info = await disco.query_info(broker, timeout=T)
    c.check("http://jabber.org/protocol/pubsub#rsm" in info.features, "broker announces pubsub#rsm")
    items = await disco.query_items(broker, require_fresh=True, timeout=T)
    found = [(str(i.jid), i.node, i.name) for i in items.items]
    c.check((args.broker, node, "IODEF incidents") in found, "disco#items on the broker lists the node with its title", str(found))
    info = await disco.query_info(broker, node=node, require_fresh=True, timeout=T)
    ids = [(i.category, i.type_) for i in info.identities]
    c.check(("pubsub", "leaf") in ids, "disco#info on the node: identity pubsub/leaf", str(ids))
    meta = [values(x) for x in info.exts if x.get_form_type() == META_DATA]
    c.check(len(meta) == 1 and meta[0].get("pubsub#type") == [iodefdoc.IODEF_NS],
            "disco#info on the node: pubsub#meta-data form with pubsub#type IODEF 2.0", str(meta))

    # ---- subscribe (§6.1) ----
    try:
        r = await asyncio.wait_for(ps_s.subscribe(broker, node), T)
        s = r.payload
        c.check(s.subscription == "subscribed" and s.jid == sub.local_jid.bare() and s.node == node,
                "subscriber subscribes (open node)", f"jid={s.jid} subscription={s.subscription} subid={s.subid}")
    except aioxmpp.errors.XMPPError as e:
        raise Fatal(f"subscribe: {err(e)}")

    # ---- publish (§7.1) and notifications ----
    docs, order = {}, []
    for n in range(1, 6):
        item_id = f"aiox-{n}"
        payload, et = IodefDocument.from_sample(f"aioxmpp-{n}")
        try:
            got = await asyncio.wait_for(ps_o.publish(broker, node, payload, id_=item_id), T)
            c.check(got == item_id, f"publish {item_id}: the id comes back", repr(got))
        except aioxmpp.errors.XMPPError as e:
            raise Fatal(f"publish {item_id}: {err(e)}")
        docs[item_id] = et
        order.append(item_id)
    for item_id in order:
        ev = await inbox.wait(lambda k, v: k == "publish", T)
        if not c.check(ev is not None, f"subscriber notified of {item_id}"):
            raise Fatal("notifications missing")
        jid, ev_node, item, _msg = ev[1]
        c.check(jid == broker and ev_node == node and item.id_ == item_id,
                f"notification for {item_id}: broker, node and item id in publish order", f"{jid} {ev_node} {item.id_}")
        p = item.registered_payload
        if c.check(isinstance(p, IodefDocument), f"notification for {item_id}: parsed as an IODEF-Document payload", type(p).__name__):
            ok, why = iodefdoc.same_ignoring_whitespace(docs[item_id], p.as_etree())
            c.check(ok, f"notification for {item_id}: IODEF payload intact", why)

    # ---- retrieve (§6.5) ----
    def ids_of(resp):
        return [i.id_ for i in resp.payload.items]

    r = await asyncio.wait_for(ps_s.get_items(broker, node), T)
    c.check(ids_of(r) == order, "retrieve all items, in publish order", str(ids_of(r)))
    bad = [i.id_ for i in r.payload.items
           if not isinstance(i.registered_payload, IodefDocument)
           or not iodefdoc.same_ignoring_whitespace(docs.get(i.id_), i.registered_payload.as_etree())[0]]
    c.check(not bad, "retrieve all: payloads intact", str(bad))
    r = await asyncio.wait_for(ps_s.get_items(broker, node, max_items=3), T)
    c.check(ids_of(r) == order[-3:], "retrieve max_items=3: the three most recent", str(ids_of(r)))
    r = await asyncio.wait_for(ps_s.get_items_by_id(broker, node, ["aiox-2", "aiox-4"]), T)
    c.check(ids_of(r) == ["aiox-2", "aiox-4"], "retrieve by ids", str(ids_of(r)))

    # XEP-0059: pages of two, following <last/> with <after/>.
    pages, rsm, count = [], rsm_xso.ResultSetMetadata.limit(2), None
    for _ in range(10):
        req = pubsub_xso.Request(pubsub_xso.Items(node))
        req.rsm = rsm
        r = await send(sub, aioxmpp.IQ(to=broker, type_=aioxmpp.IQType.GET, payload=req))
        page = ids_of(r)
        if not page:
            break
        pages.append(page)
        if r.rsm is None or r.rsm.last is None:
            c.check(False, "RSM: a non-empty page names its last item", str(page))
            break
        count = r.rsm.count
        rsm = r.rsm.next_page(2)
    c.check(pages == [order[0:2], order[2:4], order[4:5]] and count == len(order),
            "RSM paging (max 2, after=<last>): every item once, count right", f"pages={pages} count={count}")

    # ---- retract (§7.2) ----
    await asyncio.wait_for(ps_o.retract(broker, node, "aiox-3", notify=True), T)
    ev = await inbox.wait(lambda k, v: k == "retract", T)
    c.check(ev is not None and ev[1] == (broker, node, "aiox-3"), "subscriber gets the retraction of aiox-3", str(ev))
    r = await asyncio.wait_for(ps_s.get_items(broker, node), T)
    c.check(ids_of(r) == [i for i in order if i != "aiox-3"], "retracted item is gone", str(ids_of(r)))

    # ---- purge (§8.5) ----
    await asyncio.wait_for(ps_o.purge(broker, node), T)
    ev = await inbox.wait(lambda k, v: k == "purge", T)
    c.check(ev is not None and ev[1] == node, "subscriber gets a purge notification", str(ev))
    r = await asyncio.wait_for(ps_s.get_items(broker, node), T)
    c.check(ids_of(r) == [], "no items after purge", str(ids_of(r)))

    # ---- delete (§8.4) ----
    await asyncio.wait_for(ps_o.delete(broker, node), T)
    ev = await inbox.wait(lambda k, v: k == "delete", T)
    c.check(ev is not None and ev[1] == (broker, node), "subscriber gets a delete notification", str(ev))
    try:
        await disco.query_info(broker, node=node, require_fresh=True, timeout=T)
        c.check(False, "disco#info on the deleted node fails", "got a result")
    except aioxmpp.errors.XMPPCancelError as e:
        c.check(e.condition == aioxmpp.ErrorCondition.ITEM_NOT_FOUND, "disco#info on the deleted node: item-not-found", err(e))


def main():
    run_script(run, parse())


if __name__ == "__main__":
    main()
