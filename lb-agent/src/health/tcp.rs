//! The TCP check: the backend accepts a connection within the timeout. The HTTP
//! check opens its connection the same way.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

use super::CheckError;

/// Connects to `addr` before `deadline`; `timeout` is only for the failure reason.
pub(crate) async fn connect(
    addr: SocketAddr,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream, CheckError> {
    match timeout_at(deadline, TcpStream::connect(addr)).await {
        Err(_elapsed) => Err(CheckError::ConnectTimeout(timeout)),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            Err(CheckError::ConnectRefused)
        }
        Ok(Err(e)) => Err(CheckError::Connect(e)),
        Ok(Ok(stream)) => {
            // Checks are tiny request/response exchanges: do not wait for Nagle.
            // Failing to set the option does not make the backend unhealthy.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpSocket};

    const TIMEOUT: Duration = Duration::from_millis(200);

    #[tokio::test]
    async fn connects_to_a_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        connect(addr, Instant::now() + TIMEOUT, TIMEOUT)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn closed_port_is_refused() {
        let addr = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        let err = connect(addr, Instant::now() + TIMEOUT, TIMEOUT)
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "connect refused");
    }

    #[tokio::test]
    async fn a_full_accept_queue_is_a_connect_timeout() {
        // A listener that never accepts and has a tiny backlog: once its queue is full
        // the kernel drops further SYNs, so connecting hangs until the deadline.
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let timeout = Duration::from_millis(100);
        let mut held = Vec::new();
        for _ in 0..16 {
            match connect(addr, Instant::now() + timeout, timeout).await {
                Ok(stream) => held.push(stream),
                Err(err) => {
                    assert_eq!(err.to_string(), "connect timeout after 100ms");
                    return;
                }
            }
        }
        panic!("{} connections were all accepted", held.len());
    }
}
