//! A TCP proxy in front of a real HTTP server that holds back the requests
//! whose request line contains a pattern until it is released: a slow
//! upload on demand, everything else passed through untouched.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Whether held requests may go on, and how many are held now.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
    held: AtomicUsize,
}

impl Gate {
    fn pass(&self) {
        self.held.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        self.held.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The proxy. Dropping it releases what it holds; the threads of its
/// connections end with them, its listening thread with the test process.
pub struct HoldingProxy {
    port: u16,
    gate: Arc<Gate>,
}

impl HoldingProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`
    /// (`host:port`), holding requests whose request line contains `hold`.
    pub fn start(upstream: &str, hold: &'static str) -> HoldingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let gate = Arc::new(Gate::default());
        let (upstream, accepting) = (upstream.to_string(), gate.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(&upstream) else { continue };
                let (client_out, server_in) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || copy_answers(server_in, client_out));
                let gate = accepting.clone();
                std::thread::spawn(move || forward_requests(client, server, hold, &gate));
            }
        });
        HoldingProxy { port, gate }
    }

    /// Its endpoint, to configure a client with.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// How many requests it holds now.
    pub fn held(&self) -> usize {
        self.gate.held.load(Ordering::SeqCst)
    }

    /// Lets every held request (and every later one) through.
    pub fn release(&self) {
        *self.gate.open.lock().unwrap() = true;
        self.gate.opened.notify_all();
    }
}

impl Drop for HoldingProxy {
    fn drop(&mut self) {
        self.release();
    }
}

/// Forwards one connection's requests (head, then a body of its
/// `content-length`), each held at the gate first when its request line
/// contains `hold`.
fn forward_requests(client: TcpStream, mut server: TcpStream, hold: &str, gate: &Gate) {
    let mut reader = BufReader::new(client);
    loop {
        let mut head = Vec::new();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    let _ = server.shutdown(Shutdown::Write);
                    return;
                }
                Ok(_) => {}
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.trim().eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
            head.extend_from_slice(line.as_bytes());
            if line == "\r\n" {
                break;
            }
        }
        if String::from_utf8_lossy(&head).lines().next().is_some_and(|request| request.contains(hold)) {
            gate.pass();
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() || server.write_all(&head).and_then(|_| server.write_all(&body)).is_err() {
            return;
        }
    }
}

/// Copies the server's answers back to the client until either side closes.
fn copy_answers(mut server: TcpStream, mut client: TcpStream) {
    let _ = std::io::copy(&mut server, &mut client);
    let _ = client.shutdown(Shutdown::Write);
}
