//! Frames as the host reads them from the guest agent (responses, output
//! and image events): the incremental `Decoder` fed whole and in chunks,
//! and `FrameReader::with_buffered` (what the host's reader task uses,
//! after the VMM's CONNECT reply) over a stream that delivers the bytes in
//! chunks; all three must agree, and every frame must survive an
//! encode/decode round trip. Decoded agent → host messages then go through
//! the host's pure handling of them: output decoding for display, result
//! summaries, interpreter status look-ups.
//!
//! Input: `split | chunk sizes (4 bytes) | stream`: the first `split`
//! bytes of the stream are handed to the reader as already buffered.
#![no_main]

use airlock::agent_client::{ExecOutput, OutputText, RunOutput, into_result};
use airlock_fuzz::{Input, decode_all_ways};
use airlock_protocol::{Language, Message, StreamStats};
use libfuzzer_sys::fuzz_target;

fn text(bytes: &[u8], stats: &StreamStats) {
    let t = OutputText::decode(bytes, stats);
    assert!(t.total_bytes >= stats.total_bytes);
    assert!(t.truncated == stats.truncated());
    if !t.lossy && !t.truncated {
        assert_eq!(t.text.as_bytes(), bytes);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let split = usize::from(input.u8());
    let sizes: Vec<usize> = input.bytes(4).iter().map(|&b| usize::from(b) + 1).collect();
    let stream = input.rest();
    for frame in decode_all_ways(stream, split, &sizes) {
        let final_ = frame.message.is_final();
        let payload = frame.payload.clone();
        match frame.message.clone() {
            Message::ExecResult(result) => {
                let out = ExecOutput {
                    stdout: payload.clone(),
                    stderr: payload,
                    result,
                };
                let _ = out.success();
                text(&out.stdout, &out.result.stdout);
                text(&out.stderr, &out.result.stderr);
            }
            Message::RunCodeResult(result) => {
                let out = RunOutput {
                    stdout: payload.clone(),
                    stderr: payload,
                    images: Vec::new(),
                    result,
                };
                let _ = out.success();
                let _ = out.stdout_text();
                let _ = out.stderr_text();
            }
            Message::WarmStatusReply(reply) => {
                let _ = reply.all_warm();
                for l in Language::ALL {
                    let _ = reply.get(l);
                }
            }
            Message::Output(_) | Message::Image(_) => assert!(!final_),
            _ => assert!(final_),
        }
        let is_error = matches!(frame.message, Message::Error(_));
        assert_eq!(into_result(frame).is_err(), is_error);
    }
});
