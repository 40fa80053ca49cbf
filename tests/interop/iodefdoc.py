"""IODEF 2.0 test documents and payload comparison for the pubsub interop scripts
(imported, not run).

The documents are copies of tests/interop/iodef-sample.xml (valid against the
RFC 7970 schema; the Rust test checks that with xmllint) with a fresh
IncidentID, which the schema allows any string for.
"""
import os
import xml.etree.ElementTree as ET

IODEF_NS = "urn:ietf:params:xml:ns:iodef-2.0"
SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "iodef-sample.xml")


def document(incident_id):
    """The sample document with `incident_id` as IncidentID, as an ElementTree element."""
    root = ET.parse(SAMPLE).getroot()
    iid = root.find(f"{{{IODEF_NS}}}Incident/{{{IODEF_NS}}}IncidentID")
    iid.text = incident_id
    return root


def incident_id(payload):
    """The IncidentID of a received document (None if it has none)."""
    iid = payload.find(f"{{{IODEF_NS}}}Incident/{{{IODEF_NS}}}IncidentID") if payload is not None else None
    return iid.text if iid is not None else None


def canonical(e):
    """Exclusive-free C14N 2.0 form of an element: namespaces, attributes, every text
    and whitespace node compared exactly."""
    return ET.canonicalize(ET.tostring(e, encoding="unicode"))


def same(a, b):
    """(True, "") if `b` is `a` byte for byte after canonicalization; else (False, why)."""
    if a is None or b is None:
        return False, "payload missing"
    ca, cb = canonical(a), canonical(b)
    if ca == cb:
        return True, ""
    i = next((k for k, (x, y) in enumerate(zip(ca, cb)) if x != y), min(len(ca), len(cb)))
    return False, f"payloads differ at char {i}: sent {ca[max(0, i - 40):i + 40]!r}, got {cb[max(0, i - 40):i + 40]!r}"


def same_ignoring_whitespace(a, b, path="/"):
    """Structural equality with trimmed text: tag, attributes, text, children in order.
    For libraries that drop whitespace-only text when they parse a payload."""
    if a is None or b is None:
        return False, f"{path}: missing element"
    if a.tag != b.tag:
        return False, f"{path}: tag {a.tag} != {b.tag}"
    if dict(a.attrib) != dict(b.attrib):
        return False, f"{path}{a.tag}: attributes {a.attrib} != {b.attrib}"
    if (a.text or "").strip() != (b.text or "").strip():
        return False, f"{path}{a.tag}: text {a.text!r} != {b.text!r}"
    ca, cb = list(a), list(b)
    if len(ca) != len(cb):
        return False, f"{path}{a.tag}: {len(ca)} children != {len(cb)}"
    for x, y in zip(ca, cb):
        ok, why = same_ignoring_whitespace(x, y, path + a.tag.split('}')[-1] + "/")
        if not ok:
            return ok, why
    return True, ""
