//! Test validator whose behaviour is chosen by the payload text, so the host's
//! sandbox limits can each be obeyed and violated: "loop" spins forever,
//! "bomb" allocates until memory runs out, "trap" panics, "flood" returns
//! 100,000 violations, "reject" returns one violation; anything else is
//! accepted. Never use it outside tests.

// The world `use`s the types, so they are generated at the crate root.
wit_bindgen::generate!({ world: "validator", path: "../../../wit" });

struct Misbehave;

fn has(payload: &[u8], word: &str) -> bool {
    payload.windows(word.len()).any(|w| w == word.as_bytes())
}

impl Guest for Misbehave {
    fn validate(
        _topic: TopicInfo,
        _publisher: PublisherInfo,
        payload: Vec<u8>,
    ) -> Result<(), Vec<Violation>> {
        if has(&payload, "loop") {
            let mut n: u64 = 0;
            loop {
                // black_box keeps the optimiser from proving the loop useless.
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        if has(&payload, "bomb") {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(std::hint::black_box(vec![1u8; 1 << 20]));
            }
        }
        if has(&payload, "trap") {
            panic!("trap requested by the payload");
        }
        if has(&payload, "flood") {
            return Err((0..100_000)
                .map(|i| Violation {
                    location: format!("/x[{i}]"),
                    message: "flooded".into(),
                })
                .collect());
        }
        if has(&payload, "reject") {
            return Err(vec![Violation {
                location: "/x".into(),
                message: "rejected on request".into(),
            }]);
        }
        Ok(())
    }
}

export!(Misbehave);
