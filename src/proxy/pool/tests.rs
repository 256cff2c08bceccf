//! The pool against a real HTTP/1.1 server on loopback that counts its connections.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http_body_util::{BodyExt, Full};
use hyper::header::HeaderValue;
use hyper::service::service_fn;
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::*;

type Outgoing = Full<Bytes>;

/// An upstream that answers `/empty` with 204, `/close` with `Connection: close`, and
/// anything else with 64 KiB; it counts the connections it accepted and, when
/// `close_idle` is set, closes each connection after one exchange without saying so.
struct Upstream {
    url: UpstreamUrl,
    accepted: Arc<AtomicUsize>,
    hosts: Arc<Mutex<Vec<String>>>,
}

async fn upstream(close_idle: bool) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = UpstreamUrl::parse(&format!("http://{}/base", listener.local_addr().unwrap())).unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let hosts = Arc::new(Mutex::new(Vec::new()));
    let (counter, seen) = (accepted.clone(), hosts.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            let seen = seen.clone();
            let service = service_fn(move |request: Request<Incoming>| {
                let host = request.headers().get(header::HOST).map(|h| h.to_str().unwrap().to_owned());
                seen.lock().unwrap().push(format!("{} {}", host.unwrap_or_default(), request.uri()));
                async move {
                    let mut response = match request.uri().path() {
                        "/base/empty" => Response::new(Full::new(Bytes::new())),
                        _ => Response::new(Full::new(Bytes::from(vec![b'x'; 64 * 1024]))),
                    };
                    if request.uri().path() == "/base/empty" {
                        *response.status_mut() = StatusCode::NO_CONTENT;
                    }
                    if request.uri().path() == "/base/close" {
                        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    Ok::<_, Infallible>(response)
                }
            });
            tokio::spawn(async move {
                let connection =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                if close_idle {
                    // Serve one exchange, then drop the socket while the client keeps it.
                    let mut connection = std::pin::pin!(connection);
                    let _ = tokio::time::timeout(Duration::from_millis(200), connection.as_mut()).await;
                } else {
                    let _ = connection.await;
                }
            });
        }
    });
    Upstream { url, accepted, hosts }
}

fn pool() -> Pool<Outgoing> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1();
    Pool::new(https.wrap_connector(http), 16 * 1024)
}

fn request(url: &UpstreamUrl, path: &str) -> Request<Outgoing> {
    let uri = url.join(Some(&path.parse().unwrap())).unwrap();
    Request::builder().method(Method::POST).uri(uri).body(Full::new(Bytes::from_static(b"{}"))).unwrap()
}

async fn read_all(response: Response<Pooled<Outgoing>>) -> usize {
    response.into_body().collect().await.unwrap().to_bytes().len()
}

#[tokio::test]
async fn one_connection_serves_requests_one_after_another() {
    let upstream = upstream(false).await;
    let pool = pool();
    for _ in 0..20 {
        let response = pool.send(&upstream.url, request(&upstream.url, "/v1/chat/completions")).await.unwrap();
        assert_eq!(read_all(response).await, 64 * 1024);
    }
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(pool.idle_count(), 1);
    let addr = upstream.url.authority().as_str().to_owned();
    let hosts = upstream.hosts.lock().unwrap().clone();
    assert_eq!(hosts[0], format!("{addr} /base/v1/chat/completions"), "Host and an origin-form path");
}

#[tokio::test]
async fn concurrent_requests_get_connections_of_their_own_and_all_come_back() {
    let upstream = upstream(false).await;
    let pool = pool();
    let responses = futures::future::join_all(
        (0..8).map(|_| pool.send(&upstream.url, request(&upstream.url, "/v1/chat/completions"))),
    )
    .await;
    assert_eq!(pool.idle_count(), 0, "all eight bodies are still unread");
    for response in responses {
        read_all(response.unwrap()).await;
    }
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 8);
    assert_eq!(pool.idle_count(), 8);
    // The next eight reuse them.
    for _ in 0..8 {
        read_all(pool.send(&upstream.url, request(&upstream.url, "/v1/models")).await.unwrap()).await;
    }
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 8);
}

#[tokio::test]
async fn a_body_dropped_before_its_end_takes_its_connection_with_it() {
    let upstream = upstream(false).await;
    let pool = pool();
    let mut body = pool.send(&upstream.url, request(&upstream.url, "/v1/files/f/content")).await.unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().unwrap().len() < 64 * 1024, "the 64 KiB came in more than one frame");
    drop(body);
    assert_eq!(pool.idle_count(), 0);
    read_all(pool.send(&upstream.url, request(&upstream.url, "/v1/models")).await.unwrap()).await;
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 2, "a half-read connection is never reused");
}

#[tokio::test]
async fn an_answer_without_a_body_hands_the_connection_back_at_once() {
    let upstream = upstream(false).await;
    let pool = pool();
    for _ in 0..5 {
        let response = pool.send(&upstream.url, request(&upstream.url, "/empty")).await.unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        // Not even polled: the status says there is nothing to read.
        drop(response);
    }
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn connections_the_upstream_closed_are_not_used_again() {
    // `Connection: close`: the upstream says so.
    let upstream = upstream(false).await;
    let pool = pool();
    for _ in 0..3 {
        read_all(pool.send(&upstream.url, request(&upstream.url, "/close")).await.unwrap()).await;
    }
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 3);

    // Closed while idle, without a word: the next request still succeeds, on a new one.
    let upstream = self::upstream(true).await;
    for _ in 0..5 {
        let response = pool.send(&upstream.url, request(&upstream.url, "/v1/models")).await.unwrap();
        assert_eq!(read_all(response).await, 64 * 1024);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(upstream.accepted.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn a_refused_connection_is_an_error_that_says_so() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = UpstreamUrl::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
    drop(listener);
    let Err(error) = pool().send(&url, request(&url, "/v1/models")).await else { panic!("nothing listens there") };
    assert!(matches!(error, Failure::Connect(_)), "{error:?}");
}

#[tokio::test]
async fn chunks_that_have_arrived_come_out_in_one_poll() {
    // An upstream that writes the head and ten chunks of an event stream at once, then
    // keeps the stream open.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = UpstreamUrl::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut head = [0; 1024];
        let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut head).await.unwrap();
        let mut answer =
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for n in 0..10 {
            let event = format!("data: {n}\n\n");
            answer.extend_from_slice(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes());
        }
        tokio::io::AsyncWriteExt::write_all(&mut stream, &answer).await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let pool = pool();
    let mut body = pool.send(&url, request(&url, "/v1/chat/completions")).await.unwrap().into_body();
    tokio::time::sleep(Duration::from_millis(100)).await;

    // One poll of the reading task, as hyper's server makes to fill one write to its
    // client: every chunk comes out, none waits for another task (the connection's) to run.
    let frames = std::future::poll_fn(|cx| {
        let mut frames = 0;
        while let Poll::Ready(Some(frame)) = Pin::new(&mut body).poll_frame(cx) {
            assert!(frame.unwrap().is_data());
            frames += 1;
        }
        Poll::Ready(frames)
    })
    .await;
    assert_eq!(frames, 10);
}
