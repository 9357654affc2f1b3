//! The gRPC over HTTP/2 spec's rules for the answers tonic makes itself, shared
//! by the broker and the provider kit: what is not a gRPC call is refused with
//! the HTTP status the spec names, and the codes tonic gives a few of its own
//! failures are replaced by the ones the gRPC status-code spec gives. Each
//! server keeps its own words for the replaced statuses.

use std::time::Duration;

use tonic::Code;

/// An answer as tonic's server sends it.
pub type HttpResponse = http::Response<tonic::body::Body>;

/// A failure tonic answers by itself, before or around a handler, with
/// another code than the gRPC spec gives it, or with words nobody can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TonicFailure {
    /// The request message is over the service's decoding limit. tonic says
    /// `OUT_OF_RANGE`; the spec says `RESOURCE_EXHAUSTED`.
    TooLarge,
    /// The request message is not the method's protobuf message (or its
    /// frame is broken): `INTERNAL`, as the spec has it.
    Undecodable,
    /// A unary call without its request message: the spec's request
    /// cardinality violation, `UNIMPLEMENTED`; tonic says `INTERNAL`.
    NoMessage,
    /// The client's `grpc-timeout` passed before any answer: the spec's
    /// `DEADLINE_EXCEEDED`; tonic says `CANCELLED`.
    TimedOut,
    /// The request is compressed with an encoding the server does not
    /// accept: `UNIMPLEMENTED` with `grpc-accept-encoding`, as the spec has
    /// it; only the words change, since tonic's echo the client's header.
    UnknownEncoding,
}

impl TonicFailure {
    /// Which of tonic's own failures `status` is, from the texts tonic 0.14
    /// gives them (the broker's and the kit's tests send each one, so a change
    /// of text in a tonic upgrade fails them).
    pub fn of(status: &tonic::Status) -> Option<TonicFailure> {
        let message = status.message();
        match status.code() {
            Code::OutOfRange if message.starts_with("Error, decoded message length too large") => {
                Some(TonicFailure::TooLarge)
            }
            // A compressed message that decompresses past the limit.
            Code::ResourceExhausted if message.starts_with("Error decompressing: size limit") => {
                Some(TonicFailure::TooLarge)
            }
            Code::Internal if message == "Missing request message." => Some(TonicFailure::NoMessage),
            Code::Internal
                if message.starts_with("failed to decode Protobuf message")
                    || message.starts_with("protocol error: received message with")
                    || message.starts_with("Error decompressing: ")
                    || message == "Unexpected EOF decoding stream." =>
            {
                Some(TonicFailure::Undecodable)
            }
            Code::Unimplemented if message.starts_with("Content is compressed with `") => {
                Some(TonicFailure::UnknownEncoding)
            }
            Code::Cancelled if message == "Timeout expired" => Some(TonicFailure::TimedOut),
            _ => None,
        }
    }

    /// The code the gRPC spec gives this failure.
    pub fn code(self) -> Code {
        match self {
            TonicFailure::TooLarge => Code::ResourceExhausted,
            TonicFailure::Undecodable => Code::Internal,
            TonicFailure::NoMessage | TonicFailure::UnknownEncoding => Code::Unimplemented,
            TonicFailure::TimedOut => Code::DeadlineExceeded,
        }
    }
}

/// The deadline a client sent (`grpc-timeout`, e.g. `250m`), read exactly as
/// tonic's own timeout layer reads it (at most eight characters of a `u64`,
/// so `+250m` too, and a unit; anything else is no deadline): the answers
/// made at a deadline must be made for every value tonic's timer fires on.
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The status of a trailers-only answer, the form every error answer of
/// tonic takes; `None` for an answer with a message (its status comes in the
/// trailers).
pub fn trailers_only_status(response: &HttpResponse) -> Option<tonic::Status> {
    response.headers().get("grpc-status")?;
    tonic::Status::from_header_map(response.headers())
}

/// Refuses what is not a gRPC call as the gRPC over HTTP/2 spec says: a
/// method other than POST with 405, a content type other than
/// `application/grpc` (or `+proto`, or with parameters) with 415. tonic would
/// decode either as protobuf and answer it with HTTP 200, to any HTTP/2
/// client, without a certificate on the health service.
pub fn refuse_non_grpc<B>(request: &http::Request<B>) -> Option<HttpResponse> {
    if request.method() != http::Method::POST {
        return Some(plain(
            http::StatusCode::METHOD_NOT_ALLOWED,
            (http::header::ALLOW, "POST"),
        ));
    }
    let grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_grpc_content_type);
    (!grpc).then(|| {
        plain(
            http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            (http::header::ACCEPT, "application/grpc"),
        )
    })
}

/// `application/grpc`, `application/grpc+proto`, either with parameters.
fn is_grpc_content_type(value: &str) -> bool {
    let media = value.split(';').next().unwrap_or_default().trim();
    media.eq_ignore_ascii_case("application/grpc") || media.eq_ignore_ascii_case("application/grpc+proto")
}

fn plain(status: http::StatusCode, (name, value): (http::header::HeaderName, &'static str)) -> HttpResponse {
    let mut response = http::Response::new(tonic::body::Body::empty());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(name, http::HeaderValue::from_static(value));
    response
}

/// Replaces the status of a trailers-only answer with what `replace` makes of
/// it; an answer with a message, or whose status `replace` keeps (`None`), is
/// returned as it is. Other headers (`grpc-accept-encoding`) stay.
pub fn conform(
    mut response: HttpResponse,
    replace: impl FnOnce(&tonic::Status) -> Option<tonic::Status>,
) -> HttpResponse {
    let Some(status) = trailers_only_status(&response) else {
        return response;
    };
    let Some(replaced) = replace(&status) else {
        return response;
    };
    let headers = response.headers_mut();
    headers.remove("grpc-message");
    headers.remove("grpc-status-details-bin");
    // tonic percent-encodes the words, so this cannot fail for want of a
    // header value; should it, the spec's code still goes out, without words.
    if replaced.add_header(headers).is_err() {
        let _ = tonic::Status::new(replaced.code(), "").add_header(headers);
    }
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn request(method: http::Method, content_type: Option<&'static str>) -> http::Request<()> {
        let mut r = http::Request::new(());
        *r.method_mut() = method;
        if let Some(ct) = content_type {
            r.headers_mut()
                .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(ct));
        }
        r
    }

    #[test]
    fn only_grpc_calls_get_through() {
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc; charset=utf-8",
            "Application/GRPC",
        ] {
            assert!(
                refuse_non_grpc(&request(http::Method::POST, Some(ct))).is_none(),
                "{ct}"
            );
        }
        for ct in [
            None,
            Some("application/json"),
            Some("text/plain"),
            Some("application/grpc+json"),
            Some("application/grpc-web"),
        ] {
            let refused = refuse_non_grpc(&request(http::Method::POST, ct)).unwrap();
            assert_eq!(refused.status(), http::StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct:?}");
        }
        let get = refuse_non_grpc(&request(http::Method::GET, Some("application/grpc"))).unwrap();
        assert_eq!(get.status(), http::StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(get.headers()[http::header::ALLOW], "POST");
    }

    #[test]
    fn grpc_timeouts_are_read_as_the_spec_writes_them() {
        let timeout = |v: &'static str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("grpc-timeout", http::HeaderValue::from_static(v));
            grpc_timeout(&headers)
        };
        assert_eq!(timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        // tonic's timer fires on it, so the deadline answer must be made for it.
        assert_eq!(timeout("+300m"), Some(Duration::from_millis(300)));
        for bad in ["", "m", "123456789m", "-1S", "1s", "1.5S", "+m"] {
            assert_eq!(timeout(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }

    #[test]
    fn tonics_own_failures_are_recognised_and_others_are_not() {
        let cases = [
            (
                tonic::Status::out_of_range(
                    "Error, decoded message length too large: found 4194314 bytes, the limit is: 4194304 bytes",
                ),
                Some(TonicFailure::TooLarge),
            ),
            (
                tonic::Status::internal("Missing request message."),
                Some(TonicFailure::NoMessage),
            ),
            (
                tonic::Status::cancelled("Timeout expired"),
                Some(TonicFailure::TimedOut),
            ),
            (
                tonic::Status::unimplemented("Content is compressed with `zstd` which isn't supported"),
                Some(TonicFailure::UnknownEncoding),
            ),
            (
                tonic::Status::internal("failed to decode Protobuf message: invalid wire type value: 7"),
                Some(TonicFailure::Undecodable),
            ),
            (
                tonic::Status::out_of_range("entry 12 is past the signed tree head"),
                None,
            ),
            (tonic::Status::cancelled("the client cancelled"), None),
        ];
        for (status, want) in cases {
            assert_eq!(TonicFailure::of(&status), want, "{status:?}");
        }
        assert_eq!(TonicFailure::TimedOut.code(), Code::DeadlineExceeded);
        assert_eq!(TonicFailure::TooLarge.code(), Code::ResourceExhausted);
    }

    #[test]
    fn conform_rewrites_trailers_only_answers_and_keeps_other_headers() {
        let mut unknown = tonic::Status::unimplemented("Content is compressed with `zstd` which isn't supported");
        unknown
            .metadata_mut()
            .insert("grpc-accept-encoding", "gzip".parse().unwrap());
        let fixed = conform(unknown.into_http(), |s| {
            TonicFailure::of(s).map(|f| tonic::Status::new(f.code(), "send it uncompressed"))
        });
        let got = tonic::Status::from_header_map(fixed.headers()).unwrap();
        assert_eq!(got.code(), Code::Unimplemented);
        assert_eq!(got.message(), "send it uncompressed");
        assert_eq!(fixed.headers()["grpc-accept-encoding"], "gzip");
        // An answer with a message is not looked into.
        let ok = conform(http::Response::new(tonic::body::Body::empty()), |_| {
            Some(tonic::Status::internal("never"))
        });
        assert!(ok.headers().get("grpc-status").is_none());
    }
}
