//! WebCrypto for the Worker: RS256 signatures (the GitHub App's JWT) and AES-GCM sealing of stored tokens, with the platform's constant-time native crypto and no crypto crate in the Wasm.

use js_sys::{Array, Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = ["crypto", "subtle"], js_name = importKey, catch)]
    fn import_key(
        format: &str,
        key: &Uint8Array,
        algorithm: &JsValue,
        extractable: bool,
        usages: &Array,
    ) -> Result<Promise, JsValue>;
    #[wasm_bindgen(js_namespace = ["crypto", "subtle"], js_name = sign, catch)]
    fn subtle_sign(
        algorithm: &JsValue,
        key: &JsValue,
        data: &Uint8Array,
    ) -> Result<Promise, JsValue>;
    #[wasm_bindgen(js_namespace = ["crypto", "subtle"], js_name = encrypt, catch)]
    fn subtle_encrypt(
        algorithm: &JsValue,
        key: &JsValue,
        data: &Uint8Array,
    ) -> Result<Promise, JsValue>;
    #[wasm_bindgen(js_namespace = ["crypto", "subtle"], js_name = decrypt, catch)]
    fn subtle_decrypt(
        algorithm: &JsValue,
        key: &JsValue,
        data: &Uint8Array,
    ) -> Result<Promise, JsValue>;
}

/// A WebCrypto failure, with the platform's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CryptoError(pub String);

fn js_error(what: &str, e: JsValue) -> CryptoError {
    let message = e
        .dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .or_else(|| e.as_string())
        .unwrap_or_else(|| "unknown error".into());
    CryptoError(format!("{what}: {message}"))
}

fn algorithm(pairs: &[(&str, JsValue)]) -> Result<JsValue, CryptoError> {
    let object = Object::new();
    for (key, value) in pairs {
        Reflect::set(&object, &JsValue::from_str(key), value)
            .map_err(|e| js_error("algorithm", e))?;
    }
    Ok(object.into())
}

async fn settle(what: &str, promise: Result<Promise, JsValue>) -> Result<JsValue, CryptoError> {
    let promise = promise.map_err(|e| js_error(what, e))?;
    JsFuture::from(promise).await.map_err(|e| js_error(what, e))
}

fn bytes_of(value: &JsValue) -> Vec<u8> {
    Uint8Array::new(value).to_vec()
}

/// RSASSA-PKCS1-v1_5 with SHA-256 over `data`, with a PKCS#8 DER private key.
pub async fn rs256_sign(pkcs8_der: &[u8], data: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let alg = algorithm(&[
        ("name", "RSASSA-PKCS1-v1_5".into()),
        ("hash", "SHA-256".into()),
    ])?;
    let usages = Array::of1(&"sign".into());
    let key = settle(
        "importing the GitHub App's private key",
        import_key("pkcs8", &Uint8Array::from(pkcs8_der), &alg, false, &usages),
    )
    .await?;
    let signature = settle("signing", subtle_sign(&alg, &key, &Uint8Array::from(data))).await?;
    Ok(bytes_of(&signature))
}

async fn aes_key(key32: &[u8]) -> Result<JsValue, CryptoError> {
    let alg = algorithm(&[("name", "AES-GCM".into())])?;
    let usages = Array::of2(&"encrypt".into(), &"decrypt".into());
    settle(
        "importing TOKEN_ENCRYPTION_KEY",
        import_key("raw", &Uint8Array::from(key32), &alg, false, &usages),
    )
    .await
}

/// AES-256-GCM: `iv (12 bytes) || ciphertext+tag`, with a fresh random IV.
pub async fn seal(key32: &[u8], plaintext: &[u8], iv: [u8; 12]) -> Result<Vec<u8>, CryptoError> {
    let key = aes_key(key32).await?;
    let alg = algorithm(&[
        ("name", "AES-GCM".into()),
        ("iv", Uint8Array::from(&iv[..]).into()),
    ])?;
    let sealed = settle(
        "encrypting",
        subtle_encrypt(&alg, &key, &Uint8Array::from(plaintext)),
    )
    .await?;
    let mut out = iv.to_vec();
    out.extend(bytes_of(&sealed));
    Ok(out)
}

/// Opens what [`seal`] made; a wrong key or a changed byte is an error (GCM's tag).
pub async fn open(key32: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < 12 + 16 {
        return Err(CryptoError("decrypting: too short".into()));
    }
    let key = aes_key(key32).await?;
    let (iv, body) = sealed.split_at(12);
    let alg = algorithm(&[
        ("name", "AES-GCM".into()),
        ("iv", Uint8Array::from(iv).into()),
    ])?;
    let plain = settle(
        "decrypting",
        subtle_decrypt(&alg, &key, &Uint8Array::from(body)),
    )
    .await?;
    Ok(bytes_of(&plain))
}
