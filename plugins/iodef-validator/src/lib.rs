//! `iodef-validator`: the first-party xmpp-grid validator plugin for IODEF 2.0
//! (RFC 7970) payloads. The checks live in plain Rust (`rules`), testable
//! natively; the WebAssembly export is a thin adapter over them. The plugin
//! must not keep state between calls and needs no WASI.

pub mod datetime;
pub mod rules;
mod schema;
mod schema_tables;

pub use rules::{MAX_VIOLATIONS, Violation, validate};

#[cfg(target_family = "wasm")]
#[allow(clippy::too_many_arguments)] // in wit-bindgen's generated lowering code
mod component {
    // The world `use`s the types, so they are generated at this level.
    wit_bindgen::generate!({ world: "validator", path: "../../wit" });


    struct Validator;

    impl Guest for Validator {
        /// The topic and publisher do not matter to IODEF validity.
        fn validate(_topic: TopicInfo, _publisher: PublisherInfo, payload: Vec<u8>) -> Result<(), Vec<Violation>> {
            crate::validate(&payload).map_err(|list| {
                list.into_iter()
                    .map(|v| Violation { location: v.location, message: v.message })
                    .collect()
            })
        }
    }

    export!(Validator);
}
