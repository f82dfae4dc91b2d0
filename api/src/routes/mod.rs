//! One module per resource.

pub mod health;
pub mod jobs;
pub mod kv;
pub mod legacy;

use crate::error::ApiError;

/// The answer for a known path with an unsupported method.
pub async fn method_not_allowed() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
}

/// The answer for an unknown path.
pub async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such route".into()))
}
