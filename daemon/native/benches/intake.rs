//! `cargo bench`: ns per operation of the native core's per-request steps, printed, never
//! asserted (speed is measured, not tested). Compare with benches/intake_python.py, which
//! times the Python path doing the same work.

use std::hint::black_box;

use tensord_core::desc::{self, OutputRef};
use tensord_core::layout::{RecordHeader, KIND_REQUEST};
use tensord_core::msgpack;
use tensord_core::region::Region;
use tensord_core::ring::{Consumer, Geometry, Producer};
use tensord_core::signature::{Signature, Spec};

/// This thread's CPU time in ns: the machines running this are shared, and wall time would
/// count other processes' turns on the core.
fn cpu_ns() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // Safety: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
}

/// Runs `f` `n` times after a warm-up, returns CPU ns per call (best of 20 rounds).
fn time(n: u32, mut f: impl FnMut()) -> f64 {
    for _ in 0..n / 10 {
        f();
    }
    (0..20)
        .map(|_| {
            let t = cpu_ns();
            for _ in 0..n / 20 {
                f();
            }
            (cpu_ns() - t) / (n / 20) as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// The descriptor the Go client sends for a 4 KiB f32 `identity` request.
fn identity_desc() -> Vec<u8> {
    let mut o = vec![];
    msgpack::write_map_len(&mut o, 3);
    msgpack::write_str(&mut o, "model");
    msgpack::write_str(&mut o, "identity");
    msgpack::write_str(&mut o, "timeout_us");
    msgpack::write_uint(&mut o, 0);
    msgpack::write_str(&mut o, "inputs");
    msgpack::write_array_len(&mut o, 1);
    let shape = [1024u64];
    let r = OutputRef { name: "x", dtype: "f32", shape: &shape, offset: 128, nbytes: 4096 };
    // a tensor ref has the same five fields either way
    let mut one = vec![];
    desc::encode_response_outputs(&mut one, &[r]);
    o.extend_from_slice(&one[10..]); // skip {"outputs": [ : map1 + str7 + array1 = 10 bytes
    o
}

fn main() {
    let d = identity_desc();
    desc::decode_request(&d, 128, 128 + 4096).expect("a sound descriptor");
    println!("descriptor: {} bytes", d.len());

    let ns = time(1_000_000, || {
        msgpack::validate(black_box(&d)).unwrap();
    });
    println!("msgpack::validate alone: {ns:.0} ns");
    let ns = time(1_000_000, || {
        black_box(desc::decode_request(black_box(&d), 128, 128 + 4096).unwrap());
    });
    println!("decode_request (decode + every SPEC §7 check), 1 input: {ns:.0} ns");

    let sig = Signature::new("identity", vec![Spec::parse("x", "any", None).unwrap()], 0, 0);
    let mut inputs = Vec::with_capacity(4);
    let mut order = Vec::with_capacity(4);
    let ns = time(1_000_000, || {
        desc::decode_into(black_box(&d), 128, 128 + 4096, &mut inputs).unwrap();
        sig.order(&inputs, &mut order).unwrap();
        black_box(&order);
    });
    println!("decode_into + Signature::order (no allocation): {ns:.0} ns");

    let shape = [1024u64];
    let mut out = Vec::with_capacity(256);
    let ns = time(1_000_000, || {
        out.clear();
        let r = OutputRef { name: "y", dtype: "f32", shape: &shape, offset: 128, nbytes: 4096 };
        desc::encode_response_outputs(&mut out, black_box(&[r]));
        black_box(&out);
    });
    println!("encode_response_outputs, 1 output: {ns:.0} ns");

    // One ring, both ends in this thread: the consumer's share of a request.
    let cap = 1u64 << 16;
    let mut mem = vec![0u64; ((128 + cap) / 8) as usize];
    // Safety: `mem` outlives the region.
    let region = unsafe { Region::new(mem.as_mut_ptr() as *mut u8, mem.len() * 8) }.unwrap();
    let g = Geometry::new(region, 0, 128, cap).unwrap();
    let mut p = Producer::new(g);
    let mut c = Consumer::new(g, KIND_REQUEST);
    let mut got = Vec::with_capacity(8);
    let h = RecordHeader {
        record_len: 192,
        kind: KIND_REQUEST,
        request_id: 1,
        desc_len: d.len() as u32,
    };
    // Fill the ring with 256 records (untimed), then time the consumer taking them one by
    // one: poll(1) + release, the consumer's share of each request.
    let mut consumer_ns = f64::INFINITY;
    let mut producer_ns = f64::INFINITY;
    for _ in 0..2000 {
        let t = cpu_ns();
        for _ in 0..256 {
            let off = p.reserve(192).unwrap().unwrap();
            region.copy_in(off, &h.bytes()).unwrap();
            p.publish();
        }
        producer_ns = producer_ns.min((cpu_ns() - t) / 256.0);
        let t = cpu_ns();
        for _ in 0..256 {
            got.clear();
            while got.is_empty() {
                c.poll(1, &mut got).unwrap(); // a PAD at the wrap counts as one read
            }
            c.release(black_box(got[0].position)).unwrap();
        }
        consumer_ns = consumer_ns.min((cpu_ns() - t) / 256.0);
    }
    println!("Consumer poll(1) + release, one 192-byte record: {consumer_ns:.1} ns");
    println!("Producer reserve + header + publish, one record: {producer_ns:.1} ns");
    let idle = time(1_000_000, || {
        got.clear();
        c.poll(16, &mut got).unwrap();
    });
    println!("Consumer poll with nothing published: {idle:.1} ns");
}
