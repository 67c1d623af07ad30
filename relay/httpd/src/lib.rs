//! The small HTTP/1.1 server behind Shroud's metrics endpoints: the relay's
//! (`[metrics] listen`), the proxy's and the gateway's. Each program routes its own
//! paths; this crate owns what they share and what must hold under abuse:
//!
//! - at most `max_connections` connections are served at once; more are closed at
//!   accept, so a flood of connections costs a bounded amount;
//! - reading a request head may take at most [`HEAD_TIMEOUT`], and one connection may
//!   live at most [`CONNECTION_TIMEOUT`], so a slow client cannot hold a slot;
//! - an accept that fails (out of descriptors) backs off for 50 ms instead of
//!   spinning.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// Most time to read a request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Most time one connection is served.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// A response body.
pub type Body = http_body_util::Full<hyper::body::Bytes>;
/// A request as a handler sees it.
pub type Request = hyper::Request<hyper::body::Incoming>;
/// A handler: answers one request.
pub type Handler = Arc<dyn Fn(&Request) -> hyper::Response<Body> + Send + Sync>;

/// A response with `status`, `content_type` and `body`.
pub fn reply(status: u16, content_type: &str, body: String) -> hyper::Response<Body> {
    let mut r = hyper::Response::new(Body::new(body.into()));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Serves `handler` on `listener` until the runtime stops (never returns otherwise).
/// Runs on the current tokio runtime; spawns one task per connection.
pub async fn serve(listener: tokio::net::TcpListener, max_connections: usize, handler: Handler) {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // Out of file descriptors or similar: back off, retry.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(&req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A GET's whole answer; empty if the server closed (or reset) the connection
    /// without one.
    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let _ = s.write_all(req.as_bytes()).await;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    #[tokio::test(flavor = "current_thread")]
    async fn routes_through_the_handler_and_bounds_connections() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler: Handler = Arc::new(|req: &Request| match req.uri().path() {
            "/x" => reply(200, "text/plain", "x\n".into()),
            _ => reply(404, "text/plain", "no\n".into()),
        });
        tokio::spawn(serve(listener, 2, handler));
        let r = get(addr, "/x").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(
            r.contains("content-type: text/plain") && r.ends_with("x\n"),
            "{r}"
        );
        assert!(get(addr, "/y").await.starts_with("HTTP/1.1 404"));
        // Two idle connections take both slots; a third is closed at accept, and a
        // request on it gets no answer.
        let _a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(get(addr, "/x").await, "");
        drop((_a, _b));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(get(addr, "/x").await.starts_with("HTTP/1.1 200"));
    }
}
