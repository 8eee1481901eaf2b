//! Deterministic fuzzing for `cargo test`: the committed seed corpus (fuzz/corpus/<target>/)
//! replayed through the fuzz targets' bodies, then proptest with a fixed seed generating
//! structured rogue inputs for them. Exploration with cargo-fuzz stays out of CI (README.md).

use std::path::PathBuf;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use tensord_core::fuzzing;
use tensord_core::msgpack;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files.into_iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn replay_the_seed_corpus() {
    for (target, run) in [
        ("intake", fuzzing::intake as fn(&[u8])),
        ("descriptor", fuzzing::descriptor),
        ("ring", fuzzing::ring),
    ] {
        let seeds = corpus(target);
        assert!(seeds.len() >= 3, "{target}: a seed corpus is committed");
        for s in &seeds {
            run(s);
        }
    }
}

fn config() -> Config {
    Config {
        cases: 512,
        rng_seed: RngSeed::Fixed(0x007e_450d),
        failure_persistence: None,
        ..Config::default()
    }
}

/// A request descriptor that is mostly sound: the fields in any order, sometimes with a
/// field of the wrong type or value.
fn descriptor() -> impl Strategy<Value = Vec<u8>> {
    let dims = prop::collection::vec(prop_oneof![0u64..6, any::<u64>()], 0..5);
    let input = (
        prop_oneof![Just("x"), Just("t"), Just("")],
        prop_oneof![Just("f32"), Just("bytes"), Just("bool"), Just("f8")],
        dims,
        prop_oneof![(1u64..4).prop_map(|k| 64 * k), any::<u64>()],
        prop_oneof![0u64..200, any::<u64>()],
    );
    (
        prop::collection::vec(input, 0..4),
        any::<u64>(),
        prop_oneof![Just(None), (0u64..3).prop_map(Some)],
        any::<bool>(),
    )
        .prop_map(|(inputs, timeout, priority, models_last)| {
            let mut out = vec![];
            msgpack::write_map_len(&mut out, 3 + priority.is_some() as usize);
            if !models_last {
                msgpack::write_str(&mut out, "model");
                msgpack::write_str(&mut out, "m");
            }
            msgpack::write_str(&mut out, "timeout_us");
            msgpack::write_uint(&mut out, timeout % 1000);
            msgpack::write_str(&mut out, "inputs");
            msgpack::write_array_len(&mut out, inputs.len());
            for (name, dtype, shape, offset, nbytes) in &inputs {
                msgpack::write_map_len(&mut out, 5);
                for (k, v) in [("name", *name), ("dtype", *dtype)] {
                    msgpack::write_str(&mut out, k);
                    msgpack::write_str(&mut out, v);
                }
                msgpack::write_str(&mut out, "shape");
                msgpack::write_array_len(&mut out, shape.len());
                for d in shape {
                    msgpack::write_uint(&mut out, *d);
                }
                msgpack::write_str(&mut out, "offset");
                msgpack::write_uint(&mut out, *offset);
                msgpack::write_str(&mut out, "nbytes");
                msgpack::write_uint(&mut out, *nbytes);
            }
            if let Some(p) = priority {
                msgpack::write_str(&mut out, "priority");
                msgpack::write_uint(&mut out, p);
            }
            if models_last {
                msgpack::write_str(&mut out, "model");
                msgpack::write_str(&mut out, "m");
            }
            out
        })
}

/// A request record (header + descriptor + zeros) laid into a ring image.
fn record(desc: &[u8], extra: usize, rid: u64) -> Vec<u8> {
    let start = (24 + desc.len()).div_ceil(64) * 64;
    let len = start + extra * 64;
    let mut r = vec![0u8; len];
    r[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    r[4..8].copy_from_slice(&1u32.to_le_bytes());
    r[8..16].copy_from_slice(&rid.to_le_bytes());
    r[16..20].copy_from_slice(&(desc.len() as u32).to_le_bytes());
    r[24..24 + desc.len()].copy_from_slice(desc);
    r
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn descriptors_and_their_mutations(d in descriptor(), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..3)) {
        fuzzing::descriptor(&d);
        let mut m = d.clone();
        for (i, b) in flips {
            if !m.is_empty() {
                let n = m.len();
                m[i % n] ^= b;
            }
        }
        fuzzing::descriptor(&m);
    }

    #[test]
    fn rings_of_records(ds in prop::collection::vec((descriptor(), 0usize..4), 1..5), cut in any::<u16>()) {
        let mut ring = vec![];
        for (i, (d, extra)) in ds.iter().enumerate() {
            ring.extend(record(d, *extra, i as u64));
        }
        fuzzing::intake(&ring);
        ring.truncate(cut as usize % (ring.len() + 1));
        fuzzing::intake(&ring);
    }

    #[test]
    fn ring_operations(ops in prop::collection::vec(any::<u8>(), 0..512)) {
        fuzzing::ring(&ops);
    }
}
