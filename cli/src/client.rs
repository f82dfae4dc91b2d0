//! The HTTP side: one `reqwest` client with the base URL and token, key
//! paths, and every answer turned into either a body or a [`CliError`].

use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;

use crate::args::Global;
use crate::error::{CliError, Problem};

/// Characters escaped in a key put in a path: all but letters, digits and
/// `-._~`. `/` is escaped too (the API decodes `%2F` back to `/`), so a key
/// such as `a/../b` stays one segment, which URL parsing would otherwise
/// fold to `b`.
const KEY_IN_PATH: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Characters escaped in a query value.
const QUERY_VALUE: &AsciiSet = KEY_IN_PATH;

/// How long a connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The API, as one command sees it.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<HeaderValue>,
}

impl Client {
    /// A client for `global`'s URL and token.
    pub fn new(global: &Global) -> Result<Self, CliError> {
        let base = global.url.trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&base)
            .map_err(|e| CliError::Usage(format!("KVQ_URL / --url {base:?} is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(CliError::Usage(format!(
                "KVQ_URL / --url {base:?} must start with http:// or https://"
            )));
        }
        let token = match global.token.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(token) => {
                let mut value =
                    HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                        CliError::Usage(
                            "KVQ_TOKEN / --token holds characters a header cannot".into(),
                        )
                    })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(Duration::from_secs(global.request_timeout))
            .user_agent(concat!("kvq/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::Unexpected(format!("cannot set up HTTP: {e}")))?;
        Ok(Self { http, base, token })
    }

    /// The API's base URL, as given.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// A request to `path` (already encoded), with the token.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.header(AUTHORIZATION, token.clone()),
            None => request,
        }
    }

    /// Sends a request; any answer is `Ok`, whatever its status.
    pub async fn send(&self, request: RequestBuilder) -> Result<Response, CliError> {
        request.send().await.map_err(|e| self.unreachable(&e))
    }

    /// Sends a request and returns the answer if its status is a success;
    /// an error status becomes [`CliError::Api`] with its problem.
    pub async fn send_ok(&self, request: RequestBuilder) -> Result<Response, CliError> {
        let response = self.send(request).await?;
        self.check(response).await
    }

    /// The answer if its status is a success, else its problem as an error.
    pub async fn check(&self, response: Response) -> Result<Response, CliError> {
        let status = response.status();
        if status.is_success() || status == StatusCode::NOT_MODIFIED {
            return Ok(response);
        }
        Err(self.problem(response).await)
    }

    /// The error an error answer stands for.
    pub async fn problem(&self, response: Response) -> CliError {
        let status = response.status();
        let problem = match response.bytes().await {
            Ok(body) => serde_json::from_slice::<Problem>(&body).unwrap_or_default(),
            Err(e) => return self.unreachable(&e),
        };
        CliError::Api { status, problem }
    }

    /// Reads a successful answer's body as JSON, returning the text too
    /// (for `--json`, which prints the API's own bytes).
    pub async fn body<T: DeserializeOwned>(
        &self,
        response: Response,
    ) -> Result<(T, String), CliError> {
        let text = response.text().await.map_err(|e| self.unreachable(&e))?;
        let parsed = serde_json::from_str(&text).map_err(|e| {
            CliError::Unexpected(format!("the API's answer is not what kvq expects: {e}"))
        })?;
        Ok((parsed, text))
    }

    /// `GET path` and its JSON body.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<(T, String), CliError> {
        let response = self.send_ok(self.request(Method::GET, path)).await?;
        self.body(response).await
    }

    /// A transport error, described by its innermost cause ("connection
    /// refused", "operation timed out").
    fn unreachable(&self, error: &reqwest::Error) -> CliError {
        let why = if error.is_timeout() {
            "no answer in time".to_owned()
        } else {
            let mut cause: &dyn std::error::Error = error;
            while let Some(next) = cause.source() {
                cause = next;
            }
            cause.to_string()
        };
        CliError::Unreachable {
            url: self.base.clone(),
            why,
        }
    }
}

/// `/v1/kv/KEY`, the key percent-encoded. Keys `.` and `..` cannot be put
/// in a URL path (URL parsing drops such segments, escaped or not).
pub fn key_path(key: &str) -> Result<String, CliError> {
    if key.is_empty() {
        return Err(CliError::Usage("the key is empty".into()));
    }
    if key == "." || key == ".." {
        return Err(CliError::Usage(format!(
            "the key {key:?} cannot be named in a URL path, which the API needs for it"
        )));
    }
    Ok(format!("/v1/kv/{}", utf8_percent_encode(key, KEY_IN_PATH)))
}

/// `text` percent-encoded for a query value.
pub fn query_value(text: &str) -> String {
    utf8_percent_encode(text, QUERY_VALUE).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_one_encoded_segment() {
        assert_eq!(
            key_path("users/42/name").ok(),
            Some("/v1/kv/users%2F42%2Fname".into())
        );
        assert_eq!(key_path("a/../b").ok(), Some("/v1/kv/a%2F..%2Fb".into()));
        assert_eq!(
            key_path("café ?#%").ok(),
            Some("/v1/kv/caf%C3%A9%20%3F%23%25".into())
        );
        assert!(key_path("..").is_err());
        assert!(key_path("").is_err());
    }
}
