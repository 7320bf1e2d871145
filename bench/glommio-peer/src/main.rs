//! `glommio-peer ADDR CPU`: answers every request with the same 302, one task
//! per connection, glommio 0.9's TcpStream read/write (the straightforward
//! way to write a server on glommio).

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::{net::TcpListener, LocalExecutorBuilder, Placement};

const RESPONSE: &[u8] = b"HTTP/1.1 302 Found\r\nServer: glommio-peer\r\nLocation: https://shop.example.com/products/summer-sale?utm_source=clickgate&utm_medium=cpc\r\nCache-Control: no-cache, no-store, must-revalidate\r\nContent-Length: 0\r\n\r\n";

fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8091".into());
    let cpu: usize = args.next().map_or(1, |c| c.parse().unwrap());
    LocalExecutorBuilder::new(Placement::Fixed(cpu))
        .spawn(move || async move {
            let listener = TcpListener::bind(addr.as_str()).expect("bind");
            loop {
                let Ok(mut stream) = listener.accept().await else { continue };
                let _ = stream.set_nodelay(true);
                glommio::spawn_local(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut len = 0;
                    let mut out = Vec::with_capacity(4096);
                    loop {
                        let n = match stream.read(&mut buf[len..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        len += n;
                        let mut start = 0;
                        out.clear();
                        while let Some(p) = memchr::memmem::find(&buf[start..len], b"\r\n\r\n") {
                            out.extend_from_slice(RESPONSE);
                            start += p + 4;
                        }
                        buf.copy_within(start..len, 0);
                        len -= start;
                        if !out.is_empty() && stream.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                })
                .detach();
            }
        })
        .expect("executor")
        .join()
        .expect("join");
}
