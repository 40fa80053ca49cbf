#!/usr/bin/python3
"""slixmpp interop: payload plugins as a platform sees them.

The owner creates an open IODEF topic. Two subscribers subscribe: one cleared
for personal data (Cedar grant read-personal-data), one not. The owner
publishes an invalid IODEF document: slixmpp's publish must fail with
not-acceptable and the validator's violation as the error text. It then
publishes a valid document with contact e-mail, telephone and postal address:
the cleared subscriber receives them, the other one receives the item with
them removed (RFC 8600 §9), in the notification and on retrieval.

Prints one line per check; exit 0 only if all passed, 1 otherwise, 2 on timeout.
"""
import asyncio
import xml.etree.ElementTree as ET

from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.plugins.xep_0004 import Form

from gridclient import GridClient, common_args, err, run_main
from pubsubcheck import Checks, Fatal, Inbox

IODEF_NS = "urn:ietf:params:xml:ns:iodef-2.0"


def parse():
    p = common_args(__doc__)
    p.add_argument("--owner", required=True)
    p.add_argument("--cleared", required=True)
    p.add_argument("--plain", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--broker", default="broker.grid.test")
    p.add_argument("--node", default="plugin-incidents")
    p.add_argument("--invalid", required=True, help="an invalid IODEF document")
    p.add_argument("--violation", required=True, help="text the error must contain")
    p.add_argument("--valid", required=True, help="a valid IODEF document with personal data")
    p.add_argument("--personal", action="append", required=True, help="personal data in --valid")
    p.add_argument("--keep", required=True, help="text of --valid every subscriber must receive")
    p.add_argument("--step-timeout", type=float, default=5.0)
    return p.parse_args()


def client(jid, args, inbox=None):
    c = GridClient(jid, args.password, args, mech="PLAIN")
    for p in ("xep_0030", "xep_0004", "xep_0060"):
        c.register_plugin(p)
    if inbox is not None:
        def on_publish(msg):
            for it in msg["pubsub_event"]["items"].iterables:
                inbox.put(it["id"], ET.tostring(it["payload"], encoding="unicode"))
        c.add_event_handler("pubsub_publish", on_publish)
    return c


async def run(args):
    c = Checks()
    clients = []
    try:
        await flow(c, args, clients)
    except Fatal as e:
        c.check(False, "flow stopped", str(e))
    for x in clients:
        await asyncio.wait([x.disconnect()], timeout=3)
    return c.code()


async def flow(c, args, clients):
    T = args.step_timeout
    owner = client(args.owner, args)
    inboxes = {"cleared": Inbox(), "plain": Inbox()}
    subs = {"cleared": client(args.cleared, args, inboxes["cleared"]), "plain": client(args.plain, args, inboxes["plain"])}
    for x in [owner, *subs.values()]:
        clients.append(x)
        x.start()
        await x.session
        x.send_presence()

    form = Form()
    form["type"] = "submit"
    form.add_field(var="pubsub#type", value=IODEF_NS)
    form.add_field(var="pubsub#access_model", value="open")
    try:
        await owner["xep_0060"].create_node(args.broker, args.node, config=form, timeout=T)
    except (IqError, IqTimeout) as e:
        raise Fatal(f"create: {err(e)}")
    for name, s in subs.items():
        try:
            await s["xep_0060"].subscribe(args.broker, args.node, bare=True, timeout=T)
        except (IqError, IqTimeout) as e:
            raise Fatal(f"subscribe {name}: {err(e)}")
    c.check(True, "both subscribers subscribed")

    invalid = ET.fromstring(open(args.invalid, encoding="utf-8").read())
    try:
        await owner["xep_0060"].publish(args.broker, args.node, id="bad-1", payload=invalid, timeout=T)
        c.check(False, "invalid IODEF is refused", "the publish succeeded")
    except IqError as e:
        c.check(e.condition == "not-acceptable", "invalid IODEF is refused with not-acceptable", err(e))
        c.check(args.violation in (e.text or ""), "the error text carries the violation", repr(e.text))
    except IqTimeout:
        c.check(False, "invalid IODEF is refused", "timeout")

    valid = ET.fromstring(open(args.valid, encoding="utf-8").read())
    try:
        await owner["xep_0060"].publish(args.broker, args.node, id="good-1", payload=valid, timeout=T)
        c.check(True, "valid IODEF is accepted")
    except (IqError, IqTimeout) as e:
        raise Fatal(f"publish valid: {err(e)}")

    got = {}
    for name in subs:
        r = await inboxes[name].wait(lambda kind, _v: kind == "good-1", T)
        if r is None:
            raise Fatal(f"{name} received nothing")
        got[name] = r[1]
    c.check(all(p in got["cleared"] for p in args.personal), "the cleared subscriber receives the personal data")
    c.check(not any(p in got["plain"] for p in args.personal), "the other subscriber receives it redacted",
            str([p for p in args.personal if p in got["plain"]]))
    c.check(all(args.keep in v for v in got.values()), "both receive the rest of the incident")
    c.check(all(inboxes[n].items[0][0] == "good-1" for n in subs) and all(len(inboxes[n].items) == 1 for n in subs),
            "nobody received the refused item")

    try:
        r = await subs["plain"]["xep_0060"].get_items(args.broker, args.node, timeout=T)
        items = [ET.tostring(it["payload"], encoding="unicode") for it in r["pubsub"]["items"]]
    except (IqError, IqTimeout) as e:
        raise Fatal(f"retrieve: {err(e)}")
    c.check(len(items) == 1 and args.keep in items[0] and not any(p in items[0] for p in args.personal),
            "retrieval by the other subscriber is redacted too", str(items)[:300])


if __name__ == "__main__":
    run_main(run, parse())
