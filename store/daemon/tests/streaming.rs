//! Models larger than the pool, in-process: streamed through a ring of pool
//! chunks to the host backend's buffers, byte-exactly, with a prefix kept
//! for the next load; two replicas at once; and every way a streamed load
//! can end early (never drained, unloaded, shut down) handing the pool back.

mod common;

use std::time::{Duration, Instant};

use common::{CHUNK, Fixture, pattern, runtime, write_bytes};
use sllm_daemon::registry::{HostState, Limits, RegistryError};
use sllm_format::WriterOptions;

/// Chunks in the pool of every test here.
const POOL: usize = 8;

/// One checksum block per chunk, so the ring can be small.
fn options() -> WriterOptions {
    WriterOptions {
        block_bytes: CHUNK as u64,
        ..WriterOptions::default()
    }
}

/// A pool of 8 chunks and `o/big`, `chunks` chunks long (the last one
/// short); returns its bytes.
fn fixture(chunks: usize, limits: Limits) -> (Fixture, Vec<u8>) {
    let f = Fixture::new(POOL, limits);
    let bytes = pattern(chunks * CHUNK - 100);
    write_bytes(&f.models().join("o/big"), &bytes, options());
    (f, bytes)
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within 20 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_model_three_times_the_pool_streams_byte_exactly_and_keeps_a_prefix() {
    let (f, bytes) = fixture(3 * POOL, Limits::default());
    f.registry.load_to_host("o/big").unwrap();
    let path = f.start_replica("o/big", "r1", bytes.len()).unwrap();
    runtime()
        .block_on(f.registry.confirm("o/big", "r1"))
        .unwrap();
    assert!(std::fs::read(&path).unwrap() == bytes, "bytes differ");

    let st = f.registry.status("o/big").unwrap();
    assert!(st.streamed);
    assert_eq!(st.state, HostState::Loaded);
    // The partition is the tensor padded to the writer's alignment.
    assert_eq!(st.read_bytes, st.size);
    // The ring takes half the pool; the other half keeps the first chunks.
    // The last chunk stays too, for a request that would copy on from it.
    let last = st.size - (3 * POOL - 1) as u64 * CHUNK as u64;
    assert_eq!(st.resident_bytes, (POOL / 2 * CHUNK) as u64 + last);
    assert_eq!(st.chunks_landed, POOL / 2 + 1);
    wait_until("the ring's chunks back in the pool", || {
        f.registry.pool_used_bytes() == st.resident_bytes
    });
}

#[test]
fn a_second_load_copies_the_kept_prefix_and_reads_only_the_rest() {
    let (f, bytes) = fixture(3 * POOL, Limits::default());
    f.start_replica("o/big", "r1", bytes.len()).unwrap();
    runtime()
        .block_on(f.registry.confirm("o/big", "r1"))
        .unwrap();
    // The first half of the pool (the ring takes the other).
    let kept = (POOL / 2 * CHUNK) as u64;

    let path = f.start_replica("o/big", "r2", bytes.len()).unwrap();
    runtime()
        .block_on(f.registry.confirm("o/big", "r2"))
        .unwrap();
    assert!(std::fs::read(&path).unwrap() == bytes, "bytes differ");
    let st = f.registry.status("o/big").unwrap();
    assert_eq!(st.read_bytes, st.size - kept);
    assert!(st.resident_bytes > kept, "the prefix is kept again: {st:?}");
    assert_eq!(st.host_loads, 2);
}

#[test]
fn two_replicas_of_a_streamed_model_at_once_both_get_every_byte() {
    let (f, bytes) = fixture(3 * POOL, Limits::default());
    f.registry.load_to_host("o/big").unwrap();
    let a = f.start_replica("o/big", "a", bytes.len()).unwrap();
    let b = f.start_replica("o/big", "b", bytes.len()).unwrap();
    let rt = runtime();
    rt.block_on(f.registry.confirm("o/big", "a")).unwrap();
    rt.block_on(f.registry.confirm("o/big", "b")).unwrap();
    assert!(std::fs::read(&a).unwrap() == bytes, "replica a differs");
    assert!(std::fs::read(&b).unwrap() == bytes, "replica b differs");
}

#[test]
fn requests_for_one_stretch_after_another_read_the_model_once() {
    // What the Python client's staging windows send: the next stretch of
    // the model once the previous one is confirmed, the boundary chunks
    // shared.
    let (f, bytes) = fixture(3 * POOL, Limits::default());
    f.registry.load_to_host("o/big").unwrap();
    let stretch = CHUNK * 3 / 2 + 1000;
    let rt = runtime();
    let mut start = 0;
    while start < bytes.len() {
        let len = stretch.min(bytes.len() - start);
        let name = format!("w{start}");
        let (path, handle) = f.buffer(&name, len);
        f.start_with(
            "o/big",
            &name,
            vec![common::copy(start as u64, len as u64, 0)],
            vec![handle],
        )
        .unwrap();
        rt.block_on(f.registry.confirm("o/big", &name)).unwrap();
        assert!(
            std::fs::read(path).unwrap() == bytes[start..start + len],
            "stretch at {start} differs"
        );
        start += len;
    }
    assert_eq!(f.registry.status("o/big").unwrap().host_loads, 1);
}

#[test]
fn a_model_that_fits_is_still_loaded_whole() {
    let (f, bytes) = fixture(POOL, Limits::default());
    f.load_to_host("o/big");
    let st = f.registry.status("o/big").unwrap();
    assert!(!st.streamed);
    assert_eq!(st.resident_bytes, st.size);
    assert!(st.size >= bytes.len() as u64);
}

#[test]
fn a_streamed_load_no_device_drains_fails_and_hands_the_pool_back() {
    let limits = Limits {
        stream_drain_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let (f, _bytes) = fixture(3 * POOL, limits);
    f.registry.load_to_host("o/big").unwrap();
    wait_until("the load to fail", || {
        matches!(f.state("o/big"), HostState::Failed(_))
    });
    let HostState::Failed(why) = f.state("o/big") else {
        unreachable!()
    };
    for needle in ["no device took", "LoadModelAsync(GPU)", "--mem-pool-size"] {
        assert!(why.contains(needle), "{needle:?} in {why}");
    }
    wait_until("the pool to be empty", || f.registry.pool_used_bytes() == 0);
    // The next load with a device streams from the start again.
    let (path, handle) = f.buffer("after", 3 * POOL * CHUNK - 100);
    f.start_with(
        "o/big",
        "after",
        vec![common::copy(0, (3 * POOL * CHUNK - 100) as u64, 0)],
        vec![handle],
    )
    .unwrap();
    runtime()
        .block_on(f.registry.confirm("o/big", "after"))
        .unwrap();
    assert_eq!(
        std::fs::read(path).unwrap(),
        pattern(3 * POOL * CHUNK - 100)
    );
}

#[test]
fn unloading_a_streamed_load_before_any_device_cancels_it() {
    let (f, _bytes) = fixture(3 * POOL, Limits::default());
    f.registry.load_to_host("o/big").unwrap();
    f.registry.unload("o/big").unwrap();
    wait_until("the pool to be empty", || f.registry.pool_used_bytes() == 0);
    assert_eq!(f.state("o/big"), HostState::NotLoaded);
}

#[test]
fn unloading_during_a_streamed_copy_lets_it_finish_then_frees_the_pool() {
    let (f, bytes) = fixture(4 * POOL, Limits::default());
    let path = f.start_replica("o/big", "r", bytes.len()).unwrap();
    f.registry.unload("o/big").unwrap();
    runtime()
        .block_on(f.registry.confirm("o/big", "r"))
        .unwrap();
    assert!(std::fs::read(&path).unwrap() == bytes, "bytes differ");
    wait_until("the pool to be empty", || f.registry.pool_used_bytes() == 0);
}

#[test]
fn shutdown_stops_a_streamed_copy_and_frees_the_pool() {
    let (f, bytes) = fixture(4 * POOL, Limits::default());
    f.start_replica("o/big", "r", bytes.len()).unwrap();
    f.registry.shutdown();
    // Finished before the abort, or failed because of it: an answer either way.
    let _ = runtime().block_on(f.registry.confirm("o/big", "r"));
    wait_until("the pool to be empty", || f.registry.pool_used_bytes() == 0);
    let e = f.registry.load_to_host("o/big").unwrap_err();
    assert!(matches!(e, RegistryError::ShuttingDown), "{e}");
}

#[test]
fn a_pool_smaller_than_one_checksum_block_is_refused_with_the_sizes() {
    let f = Fixture::new(2, Limits::default());
    // The default block (32 MiB) spans hundreds of these 64 KiB chunks.
    common::write_model(&f.models().join("o/big"), 3 * CHUNK, 1);
    let e = f.registry.load_to_host("o/big").unwrap_err();
    assert!(matches!(e, RegistryError::PoolTooSmall { .. }), "{e}");
    for needle in [
        "--mem-pool-size",
        "all of its 3 chunks of 64.00 KiB",
        "checksum block of 32.00 MiB",
    ] {
        assert!(e.to_string().contains(needle), "{needle:?} in {e}");
    }
}

/// `o/big` loaded to host memory by a client that never follows with a
/// device request (it died): its stream fills the pool and waits.
fn abandoned_stream() -> (Fixture, Vec<u8>) {
    let (f, bytes) = fixture(3 * POOL, Limits::default());
    f.registry.load_to_host("o/big").unwrap();
    wait_until("the abandoned stream to fill the pool", || {
        f.registry.pool_used_bytes() == (POOL * CHUNK) as u64
    });
    (f, bytes)
}

/// Copies all of `model` (`bytes`) as `replica` and checks every byte, and
/// that it took seconds, not the default drain timeout (minutes).
fn load_without_waiting(f: &Fixture, model: &str, replica: &str, bytes: &[u8]) {
    let started = Instant::now();
    let path = f.start_replica(model, replica, bytes.len()).unwrap();
    runtime()
        .block_on(f.registry.confirm(model, replica))
        .unwrap();
    assert!(
        std::fs::read(&path).unwrap() == bytes,
        "{model}: bytes differ"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{model} took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_stream_no_device_reads_gives_way_to_a_model_that_fits() {
    let (f, big) = abandoned_stream();
    let small = pattern(2 * CHUNK - 10);
    write_bytes(&f.models().join("o/small"), &small, options());
    load_without_waiting(&f, "o/small", "s", &small);
    let st = f.registry.status("o/small").unwrap();
    assert!(!st.streamed, "it fits, so it is kept whole: {st:?}");
    // Giving way is no failure: the model's device request reads it again.
    assert_eq!(f.state("o/big"), HostState::NotLoaded);
    load_without_waiting(&f, "o/big", "b", &big);
}

#[test]
fn a_stream_no_device_reads_gives_way_to_another_stream() {
    let (f, _big) = abandoned_stream();
    let other = pattern(3 * POOL * CHUNK - 300);
    write_bytes(&f.models().join("o/other"), &other, options());
    load_without_waiting(&f, "o/other", "o", &other);
    assert_eq!(f.state("o/big"), HostState::NotLoaded);
}

#[test]
fn a_stream_a_device_reads_does_not_give_way() {
    // Two replicas streaming two models at once share the pool: neither
    // is stopped for the other.
    let (f, big) = fixture(3 * POOL, Limits::default());
    let other = pattern(3 * POOL * CHUNK - 300);
    write_bytes(&f.models().join("o/other"), &other, options());
    let a = f.start_replica("o/big", "a", big.len()).unwrap();
    let b = f.start_replica("o/other", "b", other.len()).unwrap();
    let rt = runtime();
    rt.block_on(f.registry.confirm("o/big", "a")).unwrap();
    rt.block_on(f.registry.confirm("o/other", "b")).unwrap();
    assert!(std::fs::read(&a).unwrap() == big, "o/big differs");
    assert!(std::fs::read(&b).unwrap() == other, "o/other differs");
}

#[test]
fn two_streams_whose_blocks_span_several_chunks_never_wait_for_each_other() {
    // Blocks of three chunks: each stream needs a ring of five, and two
    // rings do not fit in the pool of eight. A stream that held part of a
    // block while it waited for the rest could wait forever on the other
    // (until the drain timeout, minutes); blocks are leased whole.
    let f = Fixture::new(POOL, Limits::default());
    let options = WriterOptions {
        block_bytes: 3 * CHUNK as u64,
        ..WriterOptions::default()
    };
    let models: Vec<(String, Vec<u8>)> = (0..2)
        .map(|i| {
            let bytes: Vec<u8> = pattern(3 * POOL * CHUNK - 100 * (i + 1))
                .into_iter()
                .map(|b| b.wrapping_add(i as u8))
                .collect();
            let name = format!("o/m{i}");
            write_bytes(&f.models().join(&name), &bytes, options);
            (name, bytes)
        })
        .collect();
    // Named apart: a replica's name is its buffer's file name.
    let replica = |model: &str, round: usize| format!("{}-r{round}", model.replace('/', "-"));
    let rt = runtime();
    for round in 0..5 {
        let started = Instant::now();
        let paths: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = models
                .iter()
                .map(|(name, bytes)| {
                    let f = &f;
                    scope.spawn(move || {
                        f.start_replica(name, &replica(name, round), bytes.len())
                            .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for ((name, bytes), path) in models.iter().zip(&paths) {
            rt.block_on(f.registry.confirm(name, &replica(name, round)))
                .unwrap();
            assert!(std::fs::read(path).unwrap() == *bytes, "{name} differs");
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "round {round} took {:?}",
            started.elapsed()
        );
        f.registry.clear();
    }
}
