//! `privacy-redactor`: the first-party xmpp-grid transformer plugin that
//! strips contact personal data (Email, Telephone, PostalAddress) from IODEF
//! payloads for subscribers without the `read-personal-data` grant (RFC 8600
//! §9). The logic lives in `redact`, testable natively; the WebAssembly export
//! is a thin adapter. Keeps no state between calls and needs no WASI.

pub mod redact;

pub use redact::{GRANT, RedactError, redact};

/// What to deliver to one subscriber (mirrors the WIT `transformed` variant
/// without `withhold`, which this plugin never chooses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Deliver the payload as it is.
    Unchanged,
    /// Deliver this redacted payload instead.
    Rewritten(Vec<u8>),
}

/// Decides for a subscriber holding `grants`: the grant sees everything,
/// everyone else gets the payload without contact personal data.
pub fn transform(grants: &[String], payload: &[u8]) -> Result<Outcome, RedactError> {
    if grants.iter().any(|g| g == GRANT) {
        return Ok(Outcome::Unchanged);
    }
    Ok(match redact(payload)? {
        Some(bytes) => Outcome::Rewritten(bytes),
        None => Outcome::Unchanged,
    })
}

#[cfg(target_family = "wasm")]
#[allow(clippy::too_many_arguments)] // in wit-bindgen's generated lowering code
mod component {
    // The world `use`s the types, so they are generated at this level.
    wit_bindgen::generate!({ world: "transformer", path: "../../wit" });

    use crate::Outcome;

    struct Redactor;

    impl Guest for Redactor {
        /// Only the subscriber's grants matter; an unreadable payload is an
        /// error, which makes the host withhold it rather than leak it.
        fn transform(_topic: TopicInfo, subscriber: SubscriberInfo, payload: Vec<u8>) -> Result<Transformed, String> {
            match crate::transform(&subscriber.grants, &payload) {
                Ok(Outcome::Unchanged) => Ok(Transformed::Unchanged),
                Ok(Outcome::Rewritten(bytes)) => Ok(Transformed::Rewritten(bytes)),
                Err(e) => Err(e.to_string()),
            }
        }
    }

    export!(Redactor);
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &[u8] = b"<Contact xmlns=\"urn:ietf:params:xml:ns:iodef-2.0\" role=\"cc\" type=\"person\"><Email><EmailTo>a@b.example</EmailTo></Email></Contact>";

    #[test]
    fn a_subscriber_with_the_grant_gets_the_payload_unchanged() {
        assert_eq!(transform(&[GRANT.to_owned()], DOC), Ok(Outcome::Unchanged));
    }

    #[test]
    fn a_subscriber_without_the_grant_gets_it_rewritten() {
        let want = b"<Contact xmlns=\"urn:ietf:params:xml:ns:iodef-2.0\" role=\"cc\" type=\"person\"></Contact>".to_vec();
        assert_eq!(transform(&["other".to_owned()], DOC), Ok(Outcome::Rewritten(want)));
    }

    #[test]
    fn nothing_to_remove_means_unchanged() {
        let doc = b"<Contact xmlns=\"urn:ietf:params:xml:ns:iodef-2.0\" role=\"cc\" type=\"person\"/>";
        assert_eq!(transform(&[], doc), Ok(Outcome::Unchanged));
    }
}
