//! Calls the filter makes to other services while a request waits: a
//! shared quota store, an external guardrail, a cache.
//!
//! A stage that needs an answer from elsewhere issues a [`Callout`] through
//! `Host::call_out`, returns `Flow::Pause`, and the request resumes when
//! the adapter delivers the [`CalloutAnswer`] (or the timeout fires, which
//! arrives as [`CalloutAnswer::Failed`]). A call that must outlive the
//! request (settling a reservation after the answer ended) is issued with
//! `Host::call_out_detached` instead: it belongs to the root context, which
//! the proxy keeps for as long as the filter is loaded.

/// Identifies one outstanding call; the adapter's token.
pub type CalloutId = u32;

/// What a call carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalloutKind<'a> {
    /// An HTTP/1.1 or HTTP/2 request, as the cluster speaks.
    Http {
        method: &'a str,
        path: &'a str,
        authority: &'a str,
        headers: &'a [(&'a str, &'a str)],
        body: &'a [u8],
    },
    /// A unary gRPC call; the cluster must speak HTTP/2.
    Grpc {
        service: &'a str,
        method: &'a str,
        metadata: &'a [(&'a str, &'a str)],
        message: &'a [u8],
    },
}

/// One call to another service through an Envoy cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Callout<'a> {
    /// The Envoy cluster that carries it.
    pub cluster: &'a str,
    pub kind: CalloutKind<'a>,
    /// After this long the call ends as [`CalloutAnswer::Failed`].
    pub timeout_ms: u64,
}

/// How a call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CalloutAnswer {
    /// The service answered over HTTP, with any status.
    Http {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// The service answered over gRPC; `status` 0 is OK.
    Grpc { status: u32, message: Vec<u8> },
    /// No answer: the timeout fired, the connection failed or was reset,
    /// or the cluster had no healthy host. The text says which, for logs.
    Failed(String),
}

impl CalloutAnswer {
    /// The body of a successful answer (HTTP 2xx or gRPC OK).
    pub fn ok_body(&self) -> Option<&[u8]> {
        match self {
            CalloutAnswer::Http { status, body, .. } if (200..300).contains(status) => Some(body),
            CalloutAnswer::Grpc { status: 0, message } => Some(message),
            _ => None,
        }
    }
}

/// What a detached call does with its answer, in the root context: the
/// request that issued it may be gone by then, so only shared data,
/// metrics and further detached calls are of use in the host it is given.
/// `Send`: the native build runs it on Envoy's main thread.
pub type DetachedHandler = Box<dyn FnOnce(&mut dyn crate::host::Host, CalloutAnswer) + Send>;
