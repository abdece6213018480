//! Clock and randomness for the Wasm side (Date.now, crypto.getRandomValues).

use wasm_bindgen::prelude::*;

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = crypto, js_name = getRandomValues)]
    fn get_random_values(buf: &mut [u8]);
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    worker::Date::now().as_millis()
}

/// `n` bytes of cryptographic randomness as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    get_random_values(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh id with a readable prefix, e.g. `ses_3f9a...`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", random_hex(16))
}

/// True when `id` has the shape `new_id(prefix)` produces.
pub fn valid_id(prefix: &str, id: &str) -> bool {
    id.strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('_'))
        .is_some_and(|hex| {
            hex.len() == 32
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
}

/// `n` bytes of cryptographic randomness.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    get_random_values(&mut buf);
    buf
}

/// `n` random bytes as unpadded base64url (an OAuth `state`, a PKCE verifier, a nonce).
pub fn random_token(n: usize) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes(n))
}
