//! The edge's one error type: maps every refusal to an HTTP status and the JSON error body.

use nightshift_core::token::TokenError;
use nightshift_core::wire::{error_json, WireError};
use nightshift_core::CoreError;
use worker::{Headers, Response};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.to_string(),
            message: message.into(),
        }
    }
    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(404, "not_found", format!("{what} not found"))
    }
    pub fn unauthenticated() -> ApiError {
        ApiError::new(
            401,
            "unauthenticated",
            "sign in first: send Authorization: Bearer <token>",
        )
    }
    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            500,
            "internal",
            format!("internal error: {e}; retry, and report it if it persists"),
        )
    }

    pub fn into_response(self) -> worker::Result<Response> {
        json_response(self.status, error_json(&self.code, &self.message))
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        ApiError::new(e.status(), e.code(), e.to_string())
    }
}

impl From<WireError> for ApiError {
    fn from(e: WireError) -> Self {
        let status = if e.code == "body_too_large" { 413 } else { 400 };
        ApiError::new(status, e.code, e.message)
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        let status = if e == TokenError::NoSecret { 500 } else { 401 };
        ApiError::new(status, e.code(), e.to_string())
    }
}

impl From<worker::Error> for ApiError {
    fn from(e: worker::Error) -> Self {
        ApiError::internal(e)
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// A JSON response with a status.
pub fn json_response(status: u16, body: String) -> worker::Result<Response> {
    let headers = Headers::new();
    headers.set("content-type", "application/json; charset=utf-8")?;
    headers.set("cache-control", "no-store")?;
    Ok(Response::ok(body)?
        .with_status(status)
        .with_headers(headers))
}

/// Serializes a value as a JSON response.
pub fn json_of<T: serde::Serialize>(status: u16, value: &T) -> ApiResult<Response> {
    let body = serde_json::to_string(value).map_err(ApiError::internal)?;
    json_response(status, body).map_err(ApiError::from)
}
