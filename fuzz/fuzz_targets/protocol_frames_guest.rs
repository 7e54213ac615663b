//! Frames as the guest agent reads them from the host (requests: hello,
//! exec, run_code, files, limits, cancel...): `FrameReader::new` over a
//! stream delivering the bytes in chunks (the agent's read loop), the
//! exact-size `read_frame`, and the `Decoder` fed whole and in chunks; all
//! must agree, and every frame must survive an encode/decode round trip.
//! Decoded requests then go through the protocol's own helpers for them
//! (and the host's output budget for the limits an exec asks for).
//!
//! Input: `chunk sizes (4 bytes) | stream`.
#![no_main]

use airlock::agent_client::Budget;
use airlock_fuzz::{Chunked, Input, Outcome, block_on, decode_all_ways, decode_whole};
use airlock_protocol::{Language, Message, read_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let sizes: Vec<usize> = input.bytes(4).iter().map(|&b| usize::from(b) + 1).collect();
    let stream = input.rest();
    let frames = decode_all_ways(stream, 0, &sizes);

    // The exact-size reader (no read-ahead) agrees on the first frame.
    let (whole, truncated) = decode_whole(stream);
    let first = block_on(async { read_frame(&mut Chunked::new(stream, &sizes)).await });
    match (whole.first(), first) {
        (Some(Outcome::Frame(a)), Ok(Some(b))) => assert_eq!(a, &b),
        (Some(Outcome::Error(a)), Err(b)) => assert_eq!(a, &b.to_string()),
        (None, Ok(None)) => assert!(!truncated),
        (None, Err(e)) => assert!(truncated, "{e}"),
        (a, b) => panic!("read_frame differs: {a:?} vs {b:?}"),
    }

    for frame in frames {
        match &frame.message {
            Message::Exec(exec) => {
                // The host bounds what it keeps of a call by the limits the
                // request asked for.
                let b = Budget::for_limits(&exec.output);
                assert!(b.frames_max >= b.stdout_max.max(b.stderr_max));
            }
            Message::RunCode(run) => {
                let _ = Budget::for_limits(&run.output);
                let _ = run.language.name();
                assert!(Language::ALL.contains(&run.language) || run.language == Language::Unknown);
            }
            Message::ResetInterpreter(r) => {
                if let Some(l) = r.language {
                    let _ = l.name();
                }
            }
            _ => {}
        }
    }
});
