#!/usr/bin/python3
"""slixmpp interop: a sender and a receiver log in, bind, and the sender sends
the receiver a chat message; the receiver checks body and `from` (the sender's
full JID, stamped by the server).

Exit 0 only if both logged in (with the forced mechanism, if any) and the
message arrived intact; 1 otherwise; 2 on timeout. Prints what happened.
"""
import asyncio
import uuid

from gridclient import AuthFailed, GridClient, common_args, run_main


def parse():
    p = common_args(__doc__)
    p.add_argument("--sender", required=True, help="sender JID (bare)")
    p.add_argument("--sender-password", default="")
    p.add_argument("--certfile", help="sender client certificate (for EXTERNAL)")
    p.add_argument("--keyfile")
    p.add_argument("--receiver", required=True, help="receiver JID (bare)")
    p.add_argument("--receiver-password", required=True)
    p.add_argument("--mech", help="SASL mechanism the sender must use (default: slixmpp's choice)")
    p.add_argument("--no-cb", action="store_true", help="hide tls-unique from the sender's SASL (see gridclient.py)")
    return p.parse_args()


async def run(args):
    body = f"interop {uuid.uuid4()}"
    got = asyncio.get_running_loop().create_future()

    # The receiver logs in with PLAIN: only the sender's mechanism is under test.
    receiver = GridClient(args.receiver, args.receiver_password, args, mech="PLAIN")
    receiver.add_event_handler("message", lambda m: got.done() or got.set_result(m))
    receiver.start()
    receiver_jid = await receiver.session
    receiver.report("receiver")

    sender = GridClient(args.sender, args.sender_password, args, mech=args.mech, no_cb=args.no_cb,
                        certfile=args.certfile, keyfile=args.keyfile)
    sender.start()
    try:
        sender_jid = await sender.session
    except AuthFailed as e:
        print(f"sender: login failed: {e}")
        receiver.disconnect()
        return 1
    sender.report("sender")

    sender.send_message(mto=receiver_jid, mbody=body, mtype="chat")
    print(f"sender: sent {body!r} to {receiver_jid}")
    msg = await got
    print(f"receiver: got {msg['body']!r} from {msg['from']} type {msg['type']}")

    ok = True
    if args.mech and sender.mech_used != args.mech:
        print(f"FAIL: sender used {sender.mech_used}, not {args.mech}")
        ok = False
    if msg["body"] != body:
        print("FAIL: wrong body")
        ok = False
    if msg["from"].full != sender_jid:
        print(f"FAIL: from is {msg['from']}, sender is {sender_jid}")
        ok = False
    await asyncio.wait([sender.disconnect(), receiver.disconnect()], timeout=3)
    return 0 if ok else 1


if __name__ == "__main__":
    run_main(run, parse())
