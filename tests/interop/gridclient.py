"""Shared helpers for the slixmpp interop scripts (imported, not run).

The controller under test listens on ephemeral ports of 127.0.0.1 but serves the
domain grid.test, whose certificate chains to a per-test grid CA. GridClient
connects there explicitly (no DNS) and trusts only that CA.
"""
import argparse
import asyncio
import logging
import sys

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout


def common_args(description):
    """The arguments every script takes: where the server is and which CA to trust."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True, help="grid CA certificate (PEM)")
    p.add_argument("--direct-tls", action="store_true", help="XEP-0368 direct TLS instead of STARTTLS")
    p.add_argument("--timeout", type=float, default=20.0, help="overall deadline, seconds")
    p.add_argument("--debug", action="store_true", help="slixmpp debug log (the XML) on stderr")
    return p


def setup_logging(debug):
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


class GridClient(slixmpp.ClientXMPP):
    """A slixmpp client for the test grid that records how SASL went.

    mech:     force one SASL mechanism (slixmpp's `sasl_mech`, i.e. the
              feature_mechanisms plugin's `use_mech`); None lets slixmpp choose.
    no_cb:    hide the TLS channel binding from slixmpp's SASL layer. slixmpp 1.8.3
              only knows tls-unique (Python's ssl module offers nothing else); with
              that data present its plain SCRAM sends the gs2 flag "y" ("I could
              bind but you do not offer it"), which a server advertising -PLUS must
              refuse (RFC 5802 section 6). Without it slixmpp sends "n".
    """

    def __init__(self, jid, password, args, mech=None, no_cb=False, certfile=None, keyfile=None):
        super().__init__(jid, password, sasl_mech=mech)
        self.peer = (args.host, args.port)
        self.direct_tls = args.direct_tls
        self.ca_certs = args.ca
        if certfile:
            self.certfile, self.keyfile = certfile, keyfile
        self.tried = []          # SASL mechanisms the server refused, in order
        self.mech_used = None    # the one that succeeded
        self.failures = []       # SASL failure conditions received
        self.stream_errors = []  # stream error conditions received
        self.session = self.loop.create_future()
        self.add_event_handler("failed_auth", self._on_failed_auth)
        self.add_event_handler("failed_all_auth", self._on_failed_all_auth)
        self.add_event_handler("auth_success", self._on_auth_success)
        self.add_event_handler("session_start", self._on_session_start)
        self.add_event_handler("stream_error", self._on_stream_error)
        self.add_event_handler("disconnected", self._on_disconnected)
        if no_cb:
            mechs = self["feature_mechanisms"]
            inner = mechs.sasl_callback

            def without_cb(required, optional):
                creds = inner(required, optional)
                creds.pop("channel_binding", None)
                return creds
            mechs.sasl_callback = without_cb

    async def get_dns_records(self, domain, port=None):
        # No SRV/A lookup of grid.test: the server is where the test says it is.
        return [(domain, self.peer[0], self.peer[1])]

    def start(self):
        self.connect(address=self.peer, use_ssl=self.direct_tls)

    def _mech(self):
        m = self["feature_mechanisms"].mech
        return m.name if m else None

    def _on_failed_auth(self, stanza):
        self.tried.append(self._mech())
        self.failures.append(stanza["condition"])

    def _on_failed_all_auth(self, _event):
        if not self.session.done():
            self.session.set_exception(AuthFailed(self.tried, self.failures))

    def _on_auth_success(self, _stanza):
        self.mech_used = self._mech()

    def _on_session_start(self, _event):
        if not self.session.done():
            self.session.set_result(self.boundjid.full)

    def _on_stream_error(self, error):
        self.stream_errors.append(error["condition"])

    def _on_disconnected(self, reason):
        if not self.session.done():
            self.session.set_exception(AuthFailed(self.tried, self.failures, self.stream_errors, reason))

    def report(self, name):
        print(f"{name}: refused mechanisms {self.tried} ({self.failures}), "
              f"logged in with {self.mech_used} as {self.boundjid.full}")


class AuthFailed(Exception):
    """Login ended before a session: SASL failed or the server closed the stream."""

    def __init__(self, tried, failures, stream_errors=(), reason=None):
        super().__init__(f"tried {tried}, failures {failures}, stream errors {list(stream_errors)}, reason {reason!r}")
        self.tried, self.failures = tried, failures


def err(e):
    """A failed request as one line: "type/condition text", "timeout", or the exception."""
    if isinstance(e, IqError):
        return f"{e.etype}/{e.condition} {e.text or ''}".strip()
    return "timeout" if isinstance(e, IqTimeout) else repr(e)


def run_main(run, args):
    """Runs `run(args)` under the deadline and exits with its code (2 on timeout)."""
    setup_logging(args.debug)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        code = loop.run_until_complete(asyncio.wait_for(run(args), args.timeout))
    except asyncio.TimeoutError:
        print(f"FAIL: timed out after {args.timeout}s")
        code = 2
    # Let slixmpp's leftover tasks (filters, keepalives) end quietly.
    pending = asyncio.all_tasks(loop)
    for t in pending:
        t.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    print("OK" if code == 0 else f"exit {code}")
    sys.exit(code)
