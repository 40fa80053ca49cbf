//! Test transformer whose behaviour is chosen by the payload text: "loop"
//! spins forever, "trap" panics, "big" returns 8 MiB, "withhold" withholds,
//! "redact" rewrites to `<redacted xmlns='urn:test'/>`, "fail" returns the
//! plugin's own error, "whoami" rewrites to `<who xmlns='urn:test'>JID</who>`
//! with the subscriber's JID as the host passed it (empty if none); anything
//! else is delivered unchanged. Tests only.

// The world `use`s the types, so they are generated at the crate root.
wit_bindgen::generate!({ world: "transformer", path: "../../../wit" });

struct Misbehave;

fn has(payload: &[u8], word: &str) -> bool {
    payload.windows(word.len()).any(|w| w == word.as_bytes())
}

impl Guest for Misbehave {
    fn transform(
        _topic: TopicInfo,
        subscriber: SubscriberInfo,
        payload: Vec<u8>,
    ) -> Result<Transformed, String> {
        if has(&payload, "loop") {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        if has(&payload, "trap") {
            panic!("trap requested by the payload");
        }
        if has(&payload, "big") {
            return Ok(Transformed::Rewritten(vec![b'a'; 8 << 20]));
        }
        if has(&payload, "withhold") {
            return Ok(Transformed::Withhold);
        }
        if has(&payload, "redact") {
            return Ok(Transformed::Rewritten(
                b"<redacted xmlns='urn:test'/>".to_vec(),
            ));
        }
        if has(&payload, "whoami") {
            let jid = subscriber.jid.unwrap_or_default();
            return Ok(Transformed::Rewritten(format!("<who xmlns='urn:test'>{jid}</who>").into_bytes()));
        }
        if has(&payload, "fail") {
            return Err("failure requested by the payload".into());
        }
        Ok(Transformed::Unchanged)
    }
}

export!(Misbehave);
