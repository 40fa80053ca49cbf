#!/usr/bin/python3
"""slixmpp interop: a receiver for messages sent by another client.

Logs in (PLAIN, so that only the sender is under test), sends initial presence
(a message to the bare JID is delivered only to available resources, RFC 6121
§8.5.2.1.1), pings the server so that the presence has surely been processed,
prints "ready <full JID>" (the test starts the sender then), and waits for one
message. Exit 0 only if its body and the bare JID of its `from` are the
expected ones; 1 otherwise; 2 on timeout.
"""
import asyncio

from gridclient import AuthFailed, GridClient, common_args, run_main


def parse():
    p = common_args(__doc__)
    p.add_argument("--jid", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--expect-body", required=True)
    p.add_argument("--expect-from", required=True, help="bare JID of the sender")
    return p.parse_args()


async def run(args):
    got = asyncio.get_running_loop().create_future()
    client = GridClient(args.jid, args.password, args, mech="PLAIN")
    client.register_plugin("xep_0199")
    client.add_event_handler("message", lambda m: got.done() or got.set_result(m))
    client.start()
    try:
        jid = await client.session
    except AuthFailed as e:
        print(f"login failed: {e}")
        return 1
    client.send_presence()
    await client["xep_0199"].ping(jid=client.boundjid.domain, timeout=5)
    print(f"ready {jid}", flush=True)
    msg = await got
    body = msg["body"].strip()
    print(f"got {body!r} from {msg['from']} type {msg['type']}")
    await asyncio.wait([client.disconnect()], timeout=3)
    if body != args.expect_body or msg["from"].bare != args.expect_from:
        print("FAIL: unexpected body or sender")
        return 1
    return 0


if __name__ == "__main__":
    run_main(run, parse())
