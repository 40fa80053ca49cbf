//! A small, independent SCRAM client (RFC 5802, RFC 7677) for protocol tests,
//! written against the RFC rather than the server's code.
#![allow(dead_code)]

use super::B64;
use aws_lc_rs::{digest, hmac, pbkdf2};
use base64::Engine as _;
use std::num::NonZeroU32;

#[derive(Clone, Copy)]
pub enum Hash {
    Sha1,
    Sha256,
}

pub struct Client {
    hash: Hash,
    user: String,
    password: String,
    nonce: String,
    gs2: String,
    cb_data: Vec<u8>,
    auth_message: String,
    server_key: Vec<u8>,
}

impl Client {
    /// `gs2` is the GS2 header, e.g. "n,," or "p=tls-exporter,," or "y,,".
    pub fn new(hash: Hash, user: &str, password: &str, gs2: &str, cb_data: &[u8]) -> Self {
        Client {
            hash,
            user: user.into(),
            password: password.into(),
            nonce: "fyko+d2lbbFgONRv9qkxdawL".into(),
            gs2: gs2.into(),
            cb_data: cb_data.to_vec(),
            auth_message: String::new(),
            server_key: Vec::new(),
        }
    }

    fn bare(&self) -> String {
        format!("n={},r={}", self.user, self.nonce)
    }

    pub fn first(&self) -> String {
        format!("{}{}", self.gs2, self.bare())
    }

    fn alg(&self) -> (pbkdf2::Algorithm, hmac::Algorithm, &'static digest::Algorithm, usize) {
        match self.hash {
            Hash::Sha1 => (pbkdf2::PBKDF2_HMAC_SHA1, hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &digest::SHA1_FOR_LEGACY_USE_ONLY, 20),
            Hash::Sha256 => (pbkdf2::PBKDF2_HMAC_SHA256, hmac::HMAC_SHA256, &digest::SHA256, 32),
        }
    }

    /// The client-final message for a server-first message.
    pub fn last(&mut self, server_first: &str) -> String {
        let mut nonce = "";
        let mut salt = Vec::new();
        let mut iters = 0u32;
        for part in server_first.split(',') {
            if let Some(v) = part.strip_prefix("r=") {
                nonce = v;
            } else if let Some(v) = part.strip_prefix("s=") {
                salt = B64.decode(v).unwrap();
            } else if let Some(v) = part.strip_prefix("i=") {
                iters = v.parse().unwrap();
            }
        }
        let (p, h, d, len) = self.alg();
        let mut salted = vec![0u8; len];
        pbkdf2::derive(p, NonZeroU32::new(iters).unwrap(), &salt, self.password.as_bytes(), &mut salted);
        let key = hmac::Key::new(h, &salted);
        let client_key = hmac::sign(&key, b"Client Key");
        self.server_key = hmac::sign(&key, b"Server Key").as_ref().to_vec();
        let stored = digest::digest(d, client_key.as_ref());
        let mut cbind = self.gs2.as_bytes().to_vec();
        cbind.extend_from_slice(&self.cb_data);
        let without_proof = format!("c={},r={}", B64.encode(&cbind), nonce);
        self.auth_message = format!("{},{},{}", self.bare(), server_first, without_proof);
        let sig = hmac::sign(&hmac::Key::new(h, stored.as_ref()), self.auth_message.as_bytes());
        let proof: Vec<u8> = client_key.as_ref().iter().zip(sig.as_ref()).map(|(a, b)| a ^ b).collect();
        format!("{without_proof},p={}", B64.encode(proof))
    }

    /// Checks the server's final message (`v=`): mutual authentication.
    pub fn verify(&self, server_final: &str) -> bool {
        let (_, h, _, _) = self.alg();
        let expect = hmac::sign(&hmac::Key::new(h, &self.server_key), self.auth_message.as_bytes());
        server_final.strip_prefix("v=").map(|v| B64.decode(v).ok().as_deref() == Some(expect.as_ref())).unwrap_or(false)
    }
}
