#!/usr/bin/python3
"""aioxmpp interop: log in (aioxmpp 0.13 picks SCRAM, PLAIN only as fallback),
bind, ping the server and our own full JID (XEP-0199, so an IQ is routed back
to us and answered by aioxmpp), and send a chat message to ourselves.

Exit 0 only if all of that worked and the message came back with `from` equal
to our full JID; 1 on failure; 2 on timeout. Prints what it did.
"""
import argparse
import asyncio
import uuid

import aioxmpp
import aioxmpp.connector
import aioxmpp.dispatcher
import aioxmpp.ping
import aioxmpp.security_layer

from pubsubcheck import run_script


def parse():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True, help="grid CA certificate (PEM)")
    p.add_argument("--direct-tls", action="store_true", help="XEP-0368 direct TLS instead of STARTTLS")
    p.add_argument("--jid", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("--debug", action="store_true")
    return p.parse_args()


async def run(args):
    def ssl_context():
        # aioxmpp's defaults (no SSLv2/3, peer verification), trusting the grid CA.
        ctx = aioxmpp.security_layer.default_ssl_context()
        ctx.load_verify_locations(args.ca)
        return ctx

    jid = aioxmpp.JID.fromstr(args.jid)
    security = aioxmpp.make_security_layer(args.password, ssl_context_factory=ssl_context)
    connector = (aioxmpp.connector.XMPPOverTLSConnector() if args.direct_tls
                 else aioxmpp.connector.STARTTLSConnector())
    # override_peer: connect here instead of resolving grid.test.
    client = aioxmpp.Client(jid, security, override_peer=[(args.host, args.port, connector)])

    got = asyncio.get_running_loop().create_future()
    client.summon(aioxmpp.PingService)  # answers pings sent to us
    dispatcher = client.summon(aioxmpp.dispatcher.SimpleMessageDispatcher)
    dispatcher.register_callback(aioxmpp.MessageType.CHAT, None,
                                 lambda msg: got.done() or got.set_result(msg))

    async with client.connected():
        me = client.local_jid
        print(f"logged in as {me}")

        await aioxmpp.ping.ping(client, jid.replace(localpart=None, resource=None))
        print(f"pinged the server {jid.domain}")
        await aioxmpp.ping.ping(client, me)
        print(f"pinged myself {me}")

        body = f"interop {uuid.uuid4()}"
        msg = aioxmpp.Message(type_=aioxmpp.MessageType.CHAT, to=me)
        msg.body[None] = body
        await client.send(msg)
        echoed = await got
        text = echoed.body.any()
        print(f"got {text!r} from {echoed.from_}")
        if text != body or echoed.from_ != me:
            print("FAIL: wrong body or from")
            return 1
    return 0


def main():
    run_script(run, parse())


if __name__ == "__main__":
    main()
