//! Test backends on 127.0.0.1 with ephemeral ports: a TCP listener, a tiny HTTP
//! server with a settable status, a server that never answers, and one that sends
//! fixed bytes. Each records its connections and the requests it read.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What a backend does with a connection.
#[derive(Clone, Debug)]
enum Behaviour {
    /// Accept and close.
    Accept,
    /// Read the request, answer with the current status and close.
    Http,
    /// Read the request and never answer.
    Silent,
    /// Read the request, send these bytes, and close unless `hold`.
    Raw { bytes: Arc<[u8]>, hold: bool },
}

#[derive(Debug, Default)]
struct Record {
    connections: AtomicUsize,
    first_at: OnceLock<Instant>,
    status: AtomicU16,
    requests: Mutex<Vec<String>>,
    /// Statuses of the responses sent, in order.
    answered: Mutex<Vec<u16>>,
}

/// A test backend; stops accepting when dropped.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    record: Arc<Record>,
    task: JoinHandle<()>,
}

impl Backend {
    /// Accepts connections and closes them.
    pub async fn tcp() -> Self {
        Self::start(Behaviour::Accept, 0).await
    }

    /// Answers every request with `status` (see [`Backend::set_status`]).
    pub async fn http(status: u16) -> Self {
        Self::start(Behaviour::Http, status).await
    }

    /// Reads requests and never answers.
    pub async fn silent() -> Self {
        Self::start(Behaviour::Silent, 0).await
    }

    /// Answers every request with `bytes`, then closes unless `hold`.
    pub async fn raw(bytes: Vec<u8>, hold: bool) -> Self {
        Self::start(
            Behaviour::Raw {
                bytes: bytes.into(),
                hold,
            },
            0,
        )
        .await
    }

    async fn start(behaviour: Behaviour, status: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let record = Arc::new(Record {
            status: AtomicU16::new(status),
            ..Record::default()
        });
        let rec = Arc::clone(&record);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = rec.first_at.set(Instant::now());
                rec.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, behaviour.clone(), Arc::clone(&rec)));
            }
        });
        Self { addr, record, task }
    }

    /// The status the HTTP server answers with from now on.
    pub fn set_status(&self, status: u16) {
        self.record.status.store(status, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.record.connections.load(Ordering::SeqCst)
    }

    /// When the first connection was accepted.
    pub fn first_at(&self) -> Option<Instant> {
        self.record.first_at.get().copied()
    }

    /// The request heads read so far.
    pub fn requests(&self) -> Vec<String> {
        self.record.requests.lock().unwrap().clone()
    }

    /// The statuses answered so far.
    pub fn answered(&self) -> Vec<u16> {
        self.record.answered.lock().unwrap().clone()
    }

    /// The `Host` header of a request head.
    pub fn host_of(request: &str) -> Option<String> {
        request.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("host")
                .then(|| value.trim().to_owned())
        })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, behaviour: Behaviour, record: Arc<Record>) {
    if matches!(behaviour, Behaviour::Accept) {
        return;
    }
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    record
        .requests
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&head).into_owned());
    match behaviour {
        Behaviour::Accept => {}
        Behaviour::Http => {
            let status = record.status.load(Ordering::SeqCst);
            let response = format!(
                "HTTP/1.1 {status} Test\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            );
            if stream.write_all(response.as_bytes()).await.is_ok() {
                record.answered.lock().unwrap().push(status);
            }
        }
        Behaviour::Silent => tokio::time::sleep(Duration::from_secs(30)).await,
        Behaviour::Raw { bytes, hold } => {
            let _ = stream.write_all(&bytes).await;
            if hold {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    }
}

/// An address on which nothing listens (connecting is refused).
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}
