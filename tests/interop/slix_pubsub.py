#!/usr/bin/python3
"""slixmpp interop, XEP-0060 through slixmpp's own xep_0060 plugin: the whole life
of an IODEF topic on the broker.

An owner (--owner) creates a topic with a node_config form (pubsub#type IODEF 2.0,
title, open access), reads and changes its configuration; a subscriber (--subscriber)
discovers it (disco#items on the broker, disco#info on the node), subscribes, and
receives what the owner publishes (IODEF 2.0 documents), retrieves items (all,
max_items, by id, and paged with XEP-0059 through slixmpp's xep_0059 iterator), and
sees retract, purge and delete notifications.

Prints one line per check ("ok"/"FAIL"); exit 0 only if every check passed, 1
otherwise, 2 on timeout.
"""
import asyncio
import xml.etree.ElementTree as ET

from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.plugins.xep_0004 import Form
from slixmpp.plugins.xep_0059 import Set as RsmSet
from slixmpp.plugins.xep_0060.stanza import Pubsub
from slixmpp.xmlstream import register_stanza_plugin

import iodefdoc
from gridclient import GridClient, common_args, err, run_main
from pubsubcheck import Checks, Fatal, Inbox

NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
NS_DATA = "jabber:x:data"
NS_DELAY = "urn:xmpp:delay"
META_DATA = "http://jabber.org/protocol/pubsub#meta-data"
NODE_CONFIG = "http://jabber.org/protocol/pubsub#node_config"


def parse():
    p = common_args(__doc__)
    p.add_argument("--owner", required=True)
    p.add_argument("--subscriber", required=True)
    p.add_argument("--password", required=True, help="both platforms' password")
    p.add_argument("--broker", default="broker.grid.test")
    p.add_argument("--node", default="slix-iodef")
    p.add_argument("--step-timeout", type=float, default=5.0, help="per request / per notification, seconds")
    return p.parse_args()


def form_values(x):
    """{var: [values]} of a jabber:x:data element (ElementTree)."""
    out = {}
    for f in x.findall(f"{{{NS_DATA}}}field"):
        out[f.get("var")] = [v.text or "" for v in f.findall(f"{{{NS_DATA}}}value")]
    return out


def client(jid, args, inbox=None):
    c = GridClient(jid, args.password, args, mech="PLAIN")
    for p in ("xep_0030", "xep_0004", "xep_0059", "xep_0060"):
        c.register_plugin(p)
    if inbox is not None:
        c.add_event_handler("pubsub_publish", lambda m: inbox.put("publish", m))
        c.add_event_handler("pubsub_retract", lambda m: inbox.put("retract", m))
        c.add_event_handler("pubsub_purge", lambda m: inbox.put("purge", m))
        c.add_event_handler("pubsub_delete", lambda m: inbox.put("delete", m))
    return c


async def run(args):
    # slixmpp 1.8.3 knows RSM only inside disco#items; the XEP-0060 §6.5.4 place of
    # <set/> is inside <pubsub/>. One registration lets its iterator page items.
    register_stanza_plugin(Pubsub, RsmSet)

    c = Checks()
    T = args.step_timeout
    broker, node = args.broker, args.node
    inbox = Inbox()
    owner = client(args.owner, args)
    sub = client(args.subscriber, args, inbox)
    owner.start()
    sub.start()
    await owner.session
    await sub.session
    # Notifications go to available resources only (RFC 6121 §8.5.2 for headlines).
    sub.send_presence()
    await sub["xep_0030"].get_info(jid=broker, timeout=T)  # the presence has been routed

    try:
        await flow(c, args, owner, sub, inbox, T, broker, node)
    except Fatal as e:
        c.check(False, "flow stopped", str(e))
    leftovers = [k for k, _ in inbox.unconsumed()]
    c.check(not leftovers, "no unexpected notifications", str(leftovers))
    await asyncio.wait([owner.disconnect(), sub.disconnect()], timeout=3)
    return c.code()


async def flow(c, args, owner, sub, inbox, T, broker, node):
    ps_o, ps_s = owner["xep_0060"], sub["xep_0060"]

    # ---- create with a configuration form (§8.1.2) ----
    form = Form()
    form["type"] = "submit"
    form.add_field(var="pubsub#type", value=iodefdoc.IODEF_NS)
    form.add_field(var="pubsub#title", value="IODEF incidents (slixmpp)")
    form.add_field(var="pubsub#access_model", value="open")
    try:
        r = await ps_o.create_node(broker, node, config=form, timeout=T)
        created = r["pubsub"]["create"]["node"] or node
        c.check(created == node, "owner creates the node with a node_config form", f"result names {created!r}")
    except (IqError, IqTimeout) as e:
        raise Fatal(f"create: {err(e)}")

    # ---- configuration: get (§8.2.1) and set (§8.2.4) ----
    try:
        r = await ps_o.get_node_config(broker, node, timeout=T)
        cfg = r["pubsub_owner"]["configure"]["form"].get_values()
        c.check(cfg.get("FORM_TYPE") in (NODE_CONFIG, [NODE_CONFIG]), "configure get: FORM_TYPE node_config", str(cfg.get("FORM_TYPE")))
        c.check(cfg.get("pubsub#type") == iodefdoc.IODEF_NS, "configure get: pubsub#type is IODEF 2.0", str(cfg.get("pubsub#type")))
        c.check(cfg.get("pubsub#title") == "IODEF incidents (slixmpp)", "configure get: title", str(cfg.get("pubsub#title")))
        c.check(cfg.get("pubsub#access_model") == "open", "configure get: access_model open", str(cfg.get("pubsub#access_model")))
    except (IqError, IqTimeout) as e:
        c.check(False, "configure get", err(e))
    new = Form()
    new["type"] = "submit"
    new.add_field(var="FORM_TYPE", ftype="hidden", value=NODE_CONFIG)
    new.add_field(var="pubsub#title", value="IODEF incidents")
    new.add_field(var="pubsub#description", value="incident reports, RFC 7970")
    try:
        await ps_o.set_node_config(broker, node, new, timeout=T)
        r = await ps_o.get_node_config(broker, node, timeout=T)
        cfg = r["pubsub_owner"]["configure"]["form"].get_values()
        c.check(cfg.get("pubsub#title") == "IODEF incidents" and cfg.get("pubsub#description") == "incident reports, RFC 7970"
                and cfg.get("pubsub#type") == iodefdoc.IODEF_NS and cfg.get("pubsub#access_model") == "open",
                "configure set: title and description changed, the rest kept",
                f"title={cfg.get('pubsub#title')!r} description={cfg.get('pubsub#description')!r} "
                f"type={cfg.get('pubsub#type')!r} access={cfg.get('pubsub#access_model')!r}")
    except (IqError, IqTimeout) as e:
        c.check(False, "configure set", err(e))

    # ---- discovery (§5.2, §5.3, §5.4) ----
    try:
        r = await sub["xep_0030"].get_items(jid=broker, timeout=T)
        found = [(str(j), n, name) for j, n, name in r["disco_items"]["items"]]
        c.check((broker, node, "IODEF incidents") in found, "disco#items on the broker lists the node with its title", str(found))
    except (IqError, IqTimeout) as e:
        c.check(False, "disco#items on the broker", err(e))
    try:
        r = await sub["xep_0030"].get_info(jid=broker, node=node, timeout=T)
        ids = [(cat, typ) for cat, typ, _lang, _name in r["disco_info"]["identities"]]
        c.check(("pubsub", "leaf") in ids, "disco#info on the node: identity pubsub/leaf", str(ids))
        query = r.xml.find(f"{{{NS_DISCO_INFO}}}query")
        forms = [form_values(x) for x in query.findall(f"{{{NS_DATA}}}x")] if query is not None else []
        meta = [f for f in forms if f.get("FORM_TYPE") == [META_DATA]]
        c.check(len(meta) == 1, "disco#info on the node: one pubsub#meta-data form", str(forms))
        if meta:
            c.check(meta[0].get("pubsub#type") == [iodefdoc.IODEF_NS], "meta-data pubsub#type is IODEF 2.0", str(meta[0].get("pubsub#type")))
            c.check(meta[0].get("pubsub#title") == ["IODEF incidents"], "meta-data pubsub#title", str(meta[0].get("pubsub#title")))
    except (IqError, IqTimeout) as e:
        c.check(False, "disco#info on the node", err(e))

    # ---- subscribe (§6.1) ----
    try:
        r = await ps_s.subscribe(broker, node, bare=True, timeout=T)
        s = r["pubsub"]["subscription"]
        c.check(s["subscription"] == "subscribed" and s["jid"].bare == sub.boundjid.bare and s["node"] == node,
                "subscriber subscribes (open node)", f"jid={s['jid']} subscription={s['subscription']} subid={s['subid']}")
    except (IqError, IqTimeout) as e:
        raise Fatal(f"subscribe: {err(e)}")

    # ---- publish (§7.1) and notification (§7.1.2.1) ----
    docs = {}
    ids = []
    for n in range(1, 6):
        item_id = f"incident-{n}"
        doc = iodefdoc.document(f"slix-{n}")
        try:
            r = await ps_o.publish(broker, node, id=item_id, payload=doc, timeout=T)
            got_id = r["pubsub"]["publish"]["item"]["id"]
            c.check(got_id == item_id, f"publish {item_id}: the result carries the item id", repr(got_id))
        except (IqError, IqTimeout) as e:
            raise Fatal(f"publish {item_id}: {err(e)}")
        docs[item_id] = doc
        ids.append(item_id)
    # The server assigns an id when the publisher gives none (§7.1.2).
    doc = iodefdoc.document("slix-6")
    try:
        r = await ps_o.publish(broker, node, payload=doc, timeout=T)
        gen = r["pubsub"]["publish"]["item"]["id"]
        c.check(bool(gen), "publish without id: the result carries a server-generated id", repr(gen))
        docs[gen] = doc
        ids.append(gen)
    except (IqError, IqTimeout) as e:
        raise Fatal(f"publish without id: {err(e)}")

    for item_id in ids:
        ev = await inbox.wait(lambda k, m: k == "publish", T)
        if not c.check(ev is not None, f"subscriber notified of {item_id}"):
            raise Fatal("notifications missing")
        msg = ev[1]
        items = list(msg["pubsub_event"]["items"])
        got = items[0] if items else None
        c.check(msg["pubsub_event"]["items"]["node"] == node and len(items) == 1 and got["id"] == item_id,
                f"notification for {item_id}: node and item id, in publish order",
                f"node={msg['pubsub_event']['items']['node']} ids={[i['id'] for i in items]}")
        if got is not None and got["id"] in docs:
            ok, why = iodefdoc.same(docs[got["id"]], got["payload"])
            c.check(ok, f"notification for {item_id}: IODEF payload intact", why)
        c.check(str(msg["from"]) == broker and msg.xml.find(f"{{{NS_DELAY}}}delay") is None,
                f"notification for {item_id}: from the broker, live (no delay stamp)", f"from={msg['from']}")

    # ---- retrieve (§6.5) ----
    try:
        r = await ps_s.get_items(broker, node, timeout=T)
        got = list(r["pubsub"]["items"])
        c.check([i["id"] for i in got] == ids, "retrieve all items, in publish order", str([i["id"] for i in got]))
        bad = [i["id"] for i in got if not iodefdoc.same(docs.get(i["id"]), i["payload"])[0]]
        c.check(not bad, "retrieve all: payloads intact", str(bad))
    except (IqError, IqTimeout) as e:
        c.check(False, "retrieve all items", err(e))
    try:
        r = await ps_s.get_items(broker, node, max_items=2, timeout=T)
        got = [i["id"] for i in r["pubsub"]["items"]]
        c.check(got == ids[-2:], "retrieve max_items=2: the two most recent", str(got))
    except (IqError, IqTimeout) as e:
        c.check(False, "retrieve max_items", err(e))
    try:
        r = await ps_s.get_item(broker, node, "incident-3", timeout=T)
        got = list(r["pubsub"]["items"])
        c.check([i["id"] for i in got] == ["incident-3"], "retrieve by id", str([i["id"] for i in got]))
        if got:
            ok, why = iodefdoc.same(docs["incident-3"], got[0]["payload"])
            c.check(ok, "retrieve by id: payload intact", why)
    except (IqError, IqTimeout) as e:
        c.check(False, "retrieve by id", err(e))
    try:
        await ps_s.get_item(broker, node, "no-such-item", timeout=T)
        c.check(False, "retrieve an unknown id fails", "got a result")
    except IqError as e:
        c.check(e.condition == "item-not-found", "retrieve an unknown id: item-not-found", err(e))
    except IqTimeout as e:
        c.check(False, "retrieve an unknown id fails", err(e))

    # XEP-0059 paging with slixmpp's own iterator, two items a page.
    iq = sub.Iq(sto=broker, stype="get")
    iq["pubsub"]["items"]["node"] = node
    pages = []
    async for page in sub["xep_0059"].iterate(iq, "pubsub", amount=2, iq_options={"timeout": T}):
        pages.append([i["id"] for i in page["pubsub"]["items"]])
        if len(pages) > 10:
            break
    c.check(pages == [ids[0:2], ids[2:4], ids[4:6]], "RSM paging (max 2, after=<last>): three pages, every item once", str(pages))
    # Backwards (XEP-0059 §2.5: <before/> first, then before=<first>). A fresh
    # template: the iterator leaves its last <after/> in the one it used.
    iq = sub.Iq(sto=broker, stype="get")
    iq["pubsub"]["items"]["node"] = node
    pages = []
    async for page in sub["xep_0059"].iterate(iq, "pubsub", amount=4, reverse=True, iq_options={"timeout": T}):
        pages.append([i["id"] for i in page["pubsub"]["items"]])
        if len(pages) > 10:
            break
    c.check(pages == [ids[2:6], ids[0:2]], "RSM paging backwards (max 4, before=<first>): two pages", str(pages))
    # The same through get_items(iterator=True) (pages of 10: one page).
    pages = []
    async for page in ps_s.get_items(broker, node, iterator=True):
        pages.append([i["id"] for i in page["pubsub"]["items"]])
        if len(pages) > 10:
            break
    c.check(pages == [ids], "get_items(iterator=True): one page with every item", str(pages))

    # ---- publishing an existing id replaces the item (§7.1.2) ----
    newer = iodefdoc.document("slix-4-updated")
    try:
        await ps_o.publish(broker, node, id="incident-4", payload=newer, timeout=T)
        docs["incident-4"] = newer
        ev = await inbox.wait(lambda k, m: k == "publish", T)
        got = list(ev[1]["pubsub_event"]["items"]) if ev else []
        c.check([i["id"] for i in got] == ["incident-4"] and iodefdoc.same(newer, got[0]["payload"])[0],
                "republish incident-4: subscriber notified with the new payload", str([i["id"] for i in got]))
        r = await ps_s.get_items(broker, node, timeout=T)
        got = list(r["pubsub"]["items"])
        mine = [i for i in got if i["id"] == "incident-4"]
        c.check(len(got) == len(ids) and len(mine) == 1 and iodefdoc.same(newer, mine[0]["payload"])[0],
                "republish incident-4: still one item of that id, with the new payload", str([i["id"] for i in got]))
    except (IqError, IqTimeout) as e:
        c.check(False, "republish incident-4", err(e))

    # ---- retract (§7.2) with notification ----
    try:
        await ps_o.retract(broker, node, "incident-2", notify=True, timeout=T)
        c.check(True, "owner retracts incident-2")
    except (IqError, IqTimeout) as e:
        c.check(False, "owner retracts incident-2", err(e))
    ev = await inbox.wait(lambda k, m: k == "retract", T)
    if c.check(ev is not None, "subscriber gets a retract notification"):
        got = [i["id"] for i in ev[1]["pubsub_event"]["items"]]
        c.check(got == ["incident-2"] and ev[1]["pubsub_event"]["items"]["node"] == node, "retract notification names incident-2", str(got))
    try:
        r = await ps_s.get_items(broker, node, timeout=T)
        got = [i["id"] for i in r["pubsub"]["items"]]
        c.check(sorted(got) == sorted(i for i in ids if i != "incident-2"), "retracted item is gone from retrieval", str(got))
    except (IqError, IqTimeout) as e:
        c.check(False, "retrieve after retract", err(e))

    # ---- purge (§8.5) ----
    try:
        await ps_o.purge(broker, node, timeout=T)
        c.check(True, "owner purges the node")
    except (IqError, IqTimeout) as e:
        c.check(False, "owner purges the node", err(e))
    ev = await inbox.wait(lambda k, m: k == "purge", T)
    if c.check(ev is not None, "subscriber gets a purge notification"):
        c.check(ev[1]["pubsub_event"]["purge"]["node"] == node, "purge notification names the node")
    try:
        r = await ps_s.get_items(broker, node, timeout=T)
        got = [i["id"] for i in r["pubsub"]["items"]]
        c.check(got == [], "no items after purge", str(got))
    except (IqError, IqTimeout) as e:
        c.check(False, "retrieve after purge", err(e))

    # ---- delete (§8.4) ----
    try:
        await ps_o.delete_node(broker, node, timeout=T)
        c.check(True, "owner deletes the node")
    except (IqError, IqTimeout) as e:
        c.check(False, "owner deletes the node", err(e))
    ev = await inbox.wait(lambda k, m: k == "delete", T)
    if c.check(ev is not None, "subscriber gets a delete notification"):
        c.check(ev[1]["pubsub_event"]["delete"]["node"] == node, "delete notification names the node")
    try:
        await sub["xep_0030"].get_info(jid=broker, node=node, timeout=T)
        c.check(False, "disco#info on the deleted node fails", "got a result")
    except IqError as e:
        c.check(e.condition == "item-not-found", "disco#info on the deleted node: item-not-found", err(e))
    try:
        r = await sub["xep_0030"].get_items(jid=broker, timeout=T)
        found = [n for _j, n, _name in r["disco_items"]["items"]]
        c.check(node not in found, "disco#items no longer lists the node", str(found))
    except (IqError, IqTimeout) as e:
        c.check(False, "disco#items after delete", err(e))


if __name__ == "__main__":
    run_main(run, parse())
