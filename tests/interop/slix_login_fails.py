#!/usr/bin/python3
"""slixmpp interop: a login that must be refused (wrong password, unknown user,
or a SASL exchange the server must not accept).

Exit 0 only if the server refused: slixmpp reported a SASL failure (or the
server ended the stream) and no session started; 1 if the login succeeded;
2 on timeout (a hang is a failure too). Prints the mechanisms slixmpp tried,
the SASL failure conditions and any stream error.
"""
import asyncio
import time

from gridclient import AuthFailed, GridClient, common_args, run_main


def parse():
    p = common_args(__doc__)
    p.add_argument("--jid", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--mech", help="SASL mechanism to force (default: slixmpp's choice)")
    p.add_argument("--no-cb", action="store_true", help="hide tls-unique from slixmpp's SASL (see gridclient.py)")
    return p.parse_args()


async def run(args):
    started = time.monotonic()
    client = GridClient(args.jid, args.password, args, mech=args.mech, no_cb=args.no_cb)
    client.start()
    try:
        jid = await client.session
    except AuthFailed:
        print(f"refused after {time.monotonic() - started:.1f}s: tried {client.tried}, "
              f"failures {client.failures}, stream errors {client.stream_errors}")
        client.disconnect(wait=0)
        return 0 if client.failures or client.stream_errors else 1
    print(f"FAIL: logged in with {client.mech_used} as {jid}")
    client.disconnect()
    return 1


if __name__ == "__main__":
    run_main(run, parse())
