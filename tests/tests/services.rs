//! The services the end-to-end tests run on start, speak their real protocols, and are
//! gone when their handles drop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use alignx_tests::services::{start_redis, start_tansu};

fn connect(addr: std::net::SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn redis_answers_ping_and_stops_on_drop() {
    let redis = start_redis().unwrap();
    let mut s = connect(redis.addr());
    s.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"+PONG\r\n");
    let pid = redis.pid();
    drop(redis);
    assert!(!process_exists(pid), "redis-server {pid} still running after drop");
}

/// A Kafka ApiVersions v0 request, by hand: the broker speaks the Kafka wire protocol.
#[test]
fn tansu_answers_kafka_api_versions() {
    let broker = start_tansu().unwrap();
    let mut s = connect(broker.addr());
    // Request header v1: api_key 18 (ApiVersions), api_version 0, correlation_id 7,
    // client_id null; empty v0 body. Prefixed by its length.
    let request: [u8; 10] = [0, 18, 0, 0, 0, 0, 0, 7, 0xff, 0xff];
    s.write_all(&(request.len() as i32).to_be_bytes()).unwrap();
    s.write_all(&request).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut response = vec![0u8; i32::from_be_bytes(len) as usize];
    s.read_exact(&mut response).unwrap();
    assert_eq!(i32::from_be_bytes(response[0..4].try_into().unwrap()), 7, "correlation id");
    assert_eq!(i16::from_be_bytes(response[4..6].try_into().unwrap()), 0, "error code");
    let apis = i32::from_be_bytes(response[6..10].try_into().unwrap());
    assert!(apis > 10, "broker lists {apis} APIs");
    // Produce (0) and Fetch (1) must be among them: each entry is (key, min, max) as i16.
    let keys: Vec<i16> =
        response[10..].chunks(6).take(apis as usize).map(|c| i16::from_be_bytes([c[0], c[1]])).collect();
    assert!(keys.contains(&0) && keys.contains(&1), "{keys:?}");
    let pid = broker.pid();
    drop(broker);
    assert!(!process_exists(pid), "tansu {pid} still running after drop");
}
