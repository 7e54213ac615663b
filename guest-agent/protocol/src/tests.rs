use super::*;

fn samples() -> Vec<Frame> {
    vec![
        Frame::new(
            0,
            Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                client: "test".into(),
            }),
        ),
        Frame::new(
            0,
            Message::HelloOk(HelloOk {
                agent_version: "1.2.3".into(),
                protocol_version: PROTOCOL_VERSION,
            }),
        ),
        Frame::new(
            7,
            Message::error(ErrorCode::BadRequest, "nope \"quoted\" \u{1F600}"),
        ),
        Frame::new(8, Message::Cancel),
        Frame::new(u64::MAX, Message::Ping),
        Frame::new(
            9,
            Message::Pong(Pong {
                agent_version: "1.2.3".into(),
                uptime_ms: 123_456,
            }),
        ),
        Frame::new(10, Message::Shutdown),
        Frame::new(10, Message::ShutdownOk),
        Frame::new(
            11,
            Message::Output(Output {
                stream: Stream::Stderr,
            }),
        )
        .with_payload(b"hello\n".to_vec()),
    ]
    .into_iter()
    .chain(operation_samples())
    .collect()
}

/// One frame of every operation message, with fields set off their defaults.
fn operation_samples() -> Vec<Frame> {
    let stat = FileStat {
        path: "/home/sandbox/a b/\u{e9}.txt".into(),
        kind: FileKind::Symlink,
        size: u64::MAX,
        mode: 0o4755,
        mtime_ms: -1,
        uid: 1000,
        gid: 1000,
        link_target: Some("../x".into()),
    };
    let process = ExecResult {
        exit_code: Some(-1),
        signal: Some(9),
        duration_ms: 1234,
        timed_out: true,
        cancelled: true,
        oom_killed: true,
        stdout: StreamStats {
            total_bytes: 1 << 40,
            kept_bytes: 65536,
        },
        stderr: StreamStats::default(),
    };
    vec![
        Frame::new(20, Message::Done),
        Frame::new(
            21,
            Message::Exec(Exec {
                command: Command::Argv(vec!["ls".into(), "-l".into(), "\u{0}".into()]),
                cwd: Some("/tmp".into()),
                env: vec![("A".into(), "1".into()), ("A".into(), "2".into())],
                timeout_ms: Some(5),
                output: OutputLimits {
                    stdout_max: Some(1),
                    stderr_max: None,
                },
            }),
        )
        .with_payload(b"stdin \xff".to_vec()),
        Frame::new(
            22,
            Message::Exec(Exec {
                command: Command::Shell("echo \"$HOME\" | wc -c".into()),
                cwd: None,
                env: Vec::new(),
                timeout_ms: None,
                output: OutputLimits::default(),
            }),
        ),
        Frame::new(
            23,
            Message::Image(Image {
                format: ImageFormat::Png,
                width: Some(640),
                height: None,
            }),
        )
        .with_payload(b"\x89PNG\r\n\x1a\n".to_vec()),
        Frame::new(24, Message::ExecResult(process.clone())),
        Frame::new(
            25,
            Message::RunCode(RunCode {
                language: Language::Javascript,
                timeout_ms: Some(2000),
                output: OutputLimits {
                    stdout_max: None,
                    stderr_max: Some(0),
                },
            }),
        )
        .with_payload(b"1 + 1".to_vec()),
        Frame::new(
            26,
            Message::RunCodeResult(RunCodeResult {
                process,
                error: Some(CodeError {
                    name: "ZeroDivisionError".into(),
                    value: "division by zero".into(),
                    traceback: "Traceback ...\n".into(),
                }),
                state_lost: true,
                images: 2,
                images_dropped: 1,
            }),
        ),
        Frame::new(27, Message::RunCodeResult(RunCodeResult::default())),
        Frame::new(
            28,
            Message::ResetInterpreter(ResetInterpreter {
                language: Some(Language::Bash),
            }),
        ),
        Frame::new(29, Message::ResetInterpreter(ResetInterpreter::default())),
        Frame::new(30, Message::WarmStatus(WarmStatus { wait_ms: Some(1) })),
        Frame::new(
            31,
            Message::WarmStatusReply(WarmStatusReply {
                interpreters: vec![
                    InterpreterStatus {
                        language: Language::Python,
                        state: InterpreterState::Warm,
                        warm_after_ms: Some(12_000),
                        detail: None,
                        starts: 1,
                    },
                    InterpreterStatus {
                        language: Language::Bash,
                        state: InterpreterState::Failed,
                        warm_after_ms: None,
                        detail: Some("no bash".into()),
                        starts: 3,
                    },
                    InterpreterStatus {
                        language: Language::Javascript,
                        state: InterpreterState::Unavailable,
                        warm_after_ms: None,
                        detail: Some("this image (data) has no node (javascript)".into()),
                        starts: 0,
                    },
                ],
            }),
        ),
        Frame::new(
            32,
            Message::Refresh(Refresh {
                wall_clock_unix_ns: Some(1_700_000_000_000_000_000),
                egress: true,
            }),
        )
        .with_payload(vec![7; 64]),
        Frame::new(
            33,
            Message::RefreshReply(RefreshReply {
                entropy_bytes: 64,
                crng_reseeded: true,
                clock_set: true,
                reseeded: vec![Language::Python, Language::Javascript],
                egress: true,
                steps_us: vec![("entropy".into(), 5)],
                warnings: vec!["w".into()],
            }),
        ),
        Frame::new(
            34,
            Message::SetLimits(SetLimits {
                memory_max_bytes: Some(1 << 30),
                pids_max: None,
                tmp_size_bytes: Some(0),
                home_size_bytes: None,
            }),
        ),
        Frame::new(
            35,
            Message::Limits(Limits {
                cgroups: true,
                memory_max_bytes: Some(1),
                memory_current_bytes: None,
                pids_max: Some(2),
                pids_current: Some(3),
                tmp_size_bytes: Some(4),
                home_size_bytes: Some(5),
                guest_memory_bytes: Some(6),
            }),
        ),
        Frame::new(
            36,
            Message::WriteFile(WriteFile {
                path: "/home/sandbox/x".into(),
                mode: Some(0o600),
                create_parents: true,
                append: true,
            }),
        )
        .with_payload((0..=255).collect()),
        Frame::new(
            37,
            Message::ReadFile(ReadFile {
                path: "/x".into(),
                offset: 10,
                length: Some(20),
            }),
        ),
        Frame::new(
            38,
            Message::FileData(FileData {
                size: 30,
                offset: 10,
                eof: true,
            }),
        )
        .with_payload(vec![0; 20]),
        Frame::new(
            39,
            Message::ListFiles(ListFiles {
                path: "/".into(),
                recursive: true,
                max_depth: Some(2),
                max_entries: None,
            }),
        ),
        Frame::new(
            40,
            Message::FileList(FileList {
                entries: vec![stat.clone(), stat.clone()],
                truncated: true,
            }),
        ),
        Frame::new(
            41,
            Message::RemoveFile(RemoveFile {
                path: "/tmp/d".into(),
                recursive: true,
            }),
        ),
        Frame::new(42, Message::StatFile(StatFile { path: "/".into() })),
        Frame::new(43, Message::FileStat(stat)),
    ]
}

fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
    let mut dec = Decoder::new();
    dec.feed(bytes);
    let mut out = Vec::new();
    while let Some(f) = dec.decode()? {
        out.push(f);
    }
    assert_eq!(dec.buffered(), 0, "trailing bytes");
    Ok(out)
}

/// A raw frame with arbitrary fields, for malformed input.
fn raw(kind: u8, request_id: u64, header: &[u8], payload: &[u8]) -> Vec<u8> {
    let len = FIXED_HEADER_LEN + header.len() + payload.len();
    let mut v = Vec::new();
    v.extend_from_slice(&(len as u32).to_le_bytes());
    v.push(kind);
    v.extend_from_slice(&request_id.to_le_bytes());
    v.extend_from_slice(&(header.len() as u32).to_le_bytes());
    v.extend_from_slice(header);
    v.extend_from_slice(payload);
    v
}

/// xorshift64*: deterministic, dependency-free randomness for the fuzz tests.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn every_message_round_trips() {
    for frame in samples() {
        let bytes = frame.encode().unwrap();
        assert_eq!(decode_all(&bytes).unwrap(), vec![frame]);
    }
}

#[test]
fn wire_layout_is_as_documented() {
    let frame = Frame::new(0x0102_0304_0506_0708, Message::Ping).with_payload(vec![0xAA, 0xBB]);
    let bytes = frame.encode().unwrap();
    let mut expected = vec![15, 0, 0, 0, Kind::Ping as u8];
    expected.extend_from_slice(&[8, 7, 6, 5, 4, 3, 2, 1]);
    expected.extend_from_slice(&[0, 0, 0, 0, 0xAA, 0xBB]);
    assert_eq!(bytes, expected);

    let bytes = Frame::new(
        1,
        Message::Output(Output {
            stream: Stream::Stdout,
        }),
    )
    .encode()
    .unwrap();
    assert_eq!(&bytes[17..], br#"{"stream":"stdout"}"#);
}

#[test]
fn binary_payload_with_every_byte_value() {
    let payload: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let frame = Frame::new(
        42,
        Message::Output(Output {
            stream: Stream::Stdout,
        }),
    )
    .with_payload(payload.clone());
    let got = decode_all(&frame.encode().unwrap()).unwrap();
    assert_eq!(got[0].payload, payload);
    assert_eq!(got[0], frame);
}

#[test]
fn many_frames_fed_byte_by_byte() {
    let frames = samples();
    let mut bytes = Vec::new();
    for f in &frames {
        f.encode_into(&mut bytes).unwrap();
    }
    let mut dec = Decoder::new();
    let mut out = Vec::new();
    for b in &bytes {
        dec.feed(std::slice::from_ref(b));
        while let Some(f) = dec.decode().unwrap() {
            out.push(f);
        }
    }
    assert_eq!(out, frames);
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn truncated_input_waits_for_more() {
    let bytes = samples()[0].encode().unwrap();
    for cut in 0..bytes.len() {
        let mut dec = Decoder::new();
        dec.feed(&bytes[..cut]);
        assert!(dec.decode().unwrap().is_none(), "cut at {cut}");
        assert_eq!(dec.buffered(), cut);
        if cut >= 4 {
            assert_eq!(dec.missing(), Some(bytes.len() - cut));
        }
        dec.feed(&bytes[cut..]);
        assert_eq!(dec.decode().unwrap(), Some(samples()[0].clone()));
    }
}

#[test]
fn oversized_length_rejected_before_buffering() {
    for len in [
        MAX_FRAME_LEN as u32 + 1,
        u32::MAX,
        0x2054_4547, /* "GET " */
    ] {
        let mut dec = Decoder::new();
        dec.feed(&len.to_le_bytes());
        let err = dec.decode().unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
        assert!(!err.is_recoverable());
        // Nothing was reserved for the announced frame.
        assert!(dec.buf.capacity() < 1024);
    }
    // The largest legal length is accepted (and just waits for the bytes).
    let mut dec = Decoder::new();
    dec.feed(&(MAX_FRAME_LEN as u32).to_le_bytes());
    assert!(dec.decode().unwrap().is_none());
    assert!(dec.buf.capacity() < 1024);
}

#[test]
fn http_request_is_garbage() {
    let mut dec = Decoder::new();
    dec.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(matches!(dec.decode(), Err(FrameError::TooLarge { .. })));
}

#[test]
fn too_short_length_rejected() {
    for len in [0u32, 1, FIXED_HEADER_LEN as u32 - 1] {
        let mut dec = Decoder::new();
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.resize(64, 0);
        dec.feed(&bytes);
        assert!(matches!(dec.decode(), Err(FrameError::TooShort { .. })));
    }
}

#[test]
fn header_length_beyond_frame_rejected() {
    let mut bytes = raw(Kind::Ping as u8, 1, b"{}", b"");
    bytes[13..17].copy_from_slice(&100u32.to_le_bytes());
    assert!(matches!(
        decode_all(&bytes),
        Err(FrameError::BadHeaderLen { .. })
    ));
    bytes[13..17].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode_all(&bytes),
        Err(FrameError::BadHeaderLen { .. })
    ));
}

#[test]
fn garbage_json_rejected() {
    for header in [
        &b"{not json"[..],
        b"\xff\xfe",
        b"{\"protocol_version\":\"one\"}",
        b"[]",
        b"null",
    ] {
        let err = decode_all(&raw(Kind::Hello as u8, 3, header, b"")).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::BadHeader {
                    kind: Kind::Hello,
                    request_id: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!err.is_recoverable());
    }
    // A message without fields still rejects a header that is not JSON.
    assert!(matches!(
        decode_all(&raw(Kind::Ping as u8, 3, b"}{", b"")),
        Err(FrameError::BadHeader { .. })
    ));
}

#[test]
fn forward_compatible_headers() {
    // Unknown fields are ignored; a field-less message may grow fields.
    let f = decode_all(&raw(
        Kind::Pong as u8,
        5,
        br#"{"agent_version":"9","uptime_ms":1,"new_field":[1,2]}"#,
        b"",
    ))
    .unwrap();
    assert_eq!(
        f[0].message,
        Message::Pong(Pong {
            agent_version: "9".into(),
            uptime_ms: 1
        })
    );
    let f = decode_all(&raw(Kind::Ping as u8, 5, br#"{"detail":true}"#, b"")).unwrap();
    assert_eq!(f[0].message, Message::Ping);
    // An error code from a newer peer is kept as Unknown.
    let f = decode_all(&raw(
        Kind::Error as u8,
        5,
        br#"{"code":"quota","message":"m"}"#,
        b"",
    ))
    .unwrap();
    assert_eq!(f[0].message, Message::error(ErrorCode::Unknown, "m"));
}

#[test]
fn warm_states_settle_and_unavailable_is_its_own() {
    let status = |states: &[InterpreterState]| WarmStatusReply {
        interpreters: states
            .iter()
            .zip(Language::ALL)
            .map(|(&state, language)| InterpreterStatus {
                language,
                state,
                warm_after_ms: None,
                detail: None,
                starts: 0,
            })
            .collect(),
    };
    use InterpreterState::*;
    assert!(status(&[Warm, Warm, Warm]).all_warm());
    assert!(status(&[Warm, Unavailable, Stopped]).settled());
    assert!(!status(&[Warm, Unavailable, Stopped]).all_warm());
    assert!(status(&[Failed, Warm, Warm]).settled());
    assert!(!status(&[Warm, Starting, Warm]).settled());
    assert!(!status(&[Warm, Unknown, Warm]).settled());
    assert!(!status(&[]).settled());
    let json = serde_json::to_string(&Unavailable).unwrap();
    assert_eq!(json, r#""unavailable""#);
    // A peer that predates it reads a state it does not know as Unknown.
    let later: InterpreterState = serde_json::from_str(r#""hibernating""#).unwrap();
    assert_eq!(later, Unknown);
}

#[test]
fn unknown_kind_is_skipped_and_stream_stays_in_sync() {
    let mut bytes = raw(0xEE, 77, b"{\"x\":1}", b"payload");
    Frame::new(78, Message::Ping)
        .encode_into(&mut bytes)
        .unwrap();
    let mut dec = Decoder::new();
    dec.feed(&bytes);
    let err = dec.decode().unwrap_err();
    assert!(matches!(
        err,
        FrameError::UnknownKind {
            kind: 0xEE,
            request_id: 77
        }
    ));
    assert!(err.is_recoverable());
    assert_eq!(dec.decode().unwrap(), Some(Frame::new(78, Message::Ping)));
}

#[test]
fn encoder_enforces_limits() {
    let frame = Frame::new(1, Message::Ping).with_payload(vec![0; MAX_PAYLOAD_LEN + 1]);
    let mut out = b"keep".to_vec();
    assert!(matches!(
        frame.encode_into(&mut out),
        Err(FrameError::PayloadTooLarge { .. })
    ));
    assert_eq!(out, b"keep");

    let frame = Frame::new(
        1,
        Message::error(ErrorCode::Internal, "x".repeat(MAX_HEADER_LEN)),
    );
    assert!(matches!(
        frame.encode_into(&mut out),
        Err(FrameError::HeaderTooLarge { .. })
    ));
    assert_eq!(out, b"keep");

    // The largest payload round-trips.
    let frame = Frame::new(
        1,
        Message::Output(Output {
            stream: Stream::Stdout,
        }),
    )
    .with_payload(vec![0x5A; MAX_PAYLOAD_LEN]);
    assert_eq!(decode_all(&frame.encode().unwrap()).unwrap(), vec![frame]);
}

#[test]
fn every_kind_has_a_sample() {
    let kinds: std::collections::HashSet<Kind> =
        samples().iter().map(|f| f.message.kind()).collect();
    for k in Kind::ALL {
        assert!(kinds.contains(&k), "no sample for {k:?}");
    }
}

#[test]
fn operation_headers_are_forward_compatible() {
    // Fields left out take their defaults; unknown fields and values from a
    // newer peer are tolerated.
    let f = decode_all(&raw(
        Kind::RunCode as u8,
        1,
        br#"{"language":"ruby","future":1}"#,
        b"puts 1",
    ))
    .unwrap();
    assert_eq!(
        f[0].message,
        Message::RunCode(RunCode {
            language: Language::Unknown,
            timeout_ms: None,
            output: OutputLimits::default(),
        })
    );
    let f = decode_all(&raw(
        Kind::Exec as u8,
        2,
        br#"{"command":{"shell":"true"}}"#,
        b"",
    ))
    .unwrap();
    let Message::Exec(exec) = &f[0].message else {
        panic!()
    };
    assert_eq!(exec.command, Command::Shell("true".into()));
    assert!(exec.env.is_empty() && exec.cwd.is_none() && exec.timeout_ms.is_none());
    let f = decode_all(&raw(
        Kind::RunCodeResult as u8,
        3,
        br#"{"duration_ms":5,"exit_code":0}"#,
        b"",
    ))
    .unwrap();
    let Message::RunCodeResult(r) = &f[0].message else {
        panic!()
    };
    assert_eq!((r.process.exit_code, r.process.duration_ms), (Some(0), 5));
    assert!(!r.process.stdout.truncated() && r.error.is_none());
    // Done, like the other field-less messages, may grow fields.
    let f = decode_all(&raw(Kind::Done as u8, 4, br#"{"x":1}"#, b"")).unwrap();
    assert_eq!(f[0].message, Message::Done);
}

#[test]
fn result_header_layout_is_flat() {
    let bytes = Frame::new(1, Message::RunCodeResult(RunCodeResult::default()))
        .encode()
        .unwrap();
    let header: serde_json::Value = serde_json::from_slice(&bytes[17..]).unwrap();
    assert!(header.get("duration_ms").is_some(), "{header}");
    assert!(header.get("process").is_none(), "{header}");
    assert!(header.get("state_lost").is_some(), "{header}");
}

#[test]
fn only_events_are_not_final() {
    for f in samples() {
        let event = matches!(f.message.kind(), Kind::Output | Kind::Image);
        assert_eq!(f.message.is_final(), !event, "{:?}", f.message.kind());
    }
}

#[test]
fn kind_bytes_are_unique_and_stable() {
    for k in Kind::ALL {
        assert_eq!(Kind::from_u8(k as u8), Some(k));
    }
    assert_eq!(Kind::from_u8(0), None);
    assert_eq!(Kind::from_u8(0xFF), None);
    assert_eq!(Kind::Hello as u8, 1);
    assert_eq!(Kind::Ping as u8, 0x10);
    assert_eq!(Kind::Output as u8, 0x21);
    assert_eq!(Kind::RunCode as u8, 0x24);
    assert_eq!(Kind::WriteFile as u8, 0x40);
    let mut bytes: Vec<u8> = Kind::ALL.iter().map(|k| *k as u8).collect();
    bytes.sort_unstable();
    bytes.dedup();
    assert_eq!(bytes.len(), Kind::ALL.len());
}

#[test]
fn random_streams_never_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for _ in 0..2000 {
        let len = rng.below(512);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Half the time, make the length prefix plausible so that the body
        // parser is exercised too, not only the length check.
        if len >= 4 && rng.below(2) == 0 {
            let l = rng.below(len) as u32;
            bytes[..4].copy_from_slice(&l.to_le_bytes());
        }
        let mut dec = Decoder::new();
        let mut pos = 0;
        while pos < bytes.len() {
            let n = 1 + rng.below(64);
            let end = (pos + n).min(bytes.len());
            dec.feed(&bytes[pos..end]);
            pos = end;
            loop {
                match dec.decode() {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) if e.is_recoverable() => {}
                    Err(_) => {
                        pos = bytes.len();
                        break;
                    }
                }
            }
        }
    }
}

#[test]
fn mutated_frames_never_panic() {
    let mut rng = Rng(42);
    let mut valid = Vec::new();
    for f in samples() {
        f.encode_into(&mut valid).unwrap();
    }
    for _ in 0..5000 {
        let mut bytes = valid.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(bytes.len());
            bytes[i] ^= 1 << rng.below(8);
        }
        bytes.truncate(bytes.len() - rng.below(8));
        let mut dec = Decoder::new();
        dec.feed(&bytes);
        while let Ok(Some(_)) | Err(FrameError::UnknownKind { .. }) = dec.decode() {}
    }
}

#[cfg(feature = "tokio")]
mod async_io {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn write_then_read_frames() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let frames = samples();
        let sent = frames.clone();
        let writer = tokio::spawn(async move {
            for f in &sent {
                write_frame(&mut a, f).await.unwrap();
            }
        });
        for f in &frames {
            assert_eq!(read_frame(&mut b).await.unwrap().as_ref(), Some(f));
        }
        writer.await.unwrap();
        assert!(read_frame(&mut b).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn frame_reader_batches_and_handles_big_frames() {
        let (mut a, b) = tokio::io::duplex(4096);
        let big = Frame::new(
            3,
            Message::Output(Output {
                stream: Stream::Stdout,
            }),
        )
        .with_payload((0..3_000_000u32).map(|i| i as u8).collect());
        let mut frames = samples();
        frames.push(big);
        frames.push(Frame::new(4, Message::Ping));
        let sent = frames.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            for f in &sent {
                f.encode_into(&mut buf).unwrap();
            }
            a.write_all(&buf).await.unwrap();
        });
        let mut reader = FrameReader::with_buffered(b, &[]);
        for f in &frames {
            assert_eq!(reader.read_frame().await.unwrap().as_ref(), Some(f));
        }
        assert!(reader.read_frame().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn eof_mid_frame_is_truncated() {
        let bytes = samples()[0].encode().unwrap();
        for cut in [1, 4, 10, bytes.len() - 1] {
            let (mut a, b) = tokio::io::duplex(4096);
            a.write_all(&bytes[..cut]).await.unwrap();
            drop(a);
            let mut reader = FrameReader::new(b);
            let err = reader.read_frame().await.unwrap_err();
            assert!(matches!(err, FrameError::Truncated { buffered } if buffered == cut));

            let mut slice = &bytes[..cut];
            assert!(matches!(
                read_frame(&mut slice).await,
                Err(FrameError::Truncated { .. })
            ));
        }
    }

    #[tokio::test]
    async fn read_frame_rejects_oversize_without_reading_on() {
        let mut bytes = u32::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 100]);
        let mut slice = &bytes[..];
        assert!(matches!(
            read_frame(&mut slice).await,
            Err(FrameError::TooLarge { .. })
        ));
        // Only the prefix was consumed.
        assert_eq!(slice.len(), 100);
    }

    #[tokio::test]
    async fn buffered_preamble_bytes_are_decoded_first() {
        let first = Frame::new(1, Message::Ping).encode().unwrap();
        let (split_at, rest) = first.split_at(5);
        let (mut a, b) = tokio::io::duplex(4096);
        a.write_all(rest).await.unwrap();
        drop(a);
        let mut reader = FrameReader::with_buffered(b, split_at);
        assert_eq!(
            reader.read_frame().await.unwrap(),
            Some(Frame::new(1, Message::Ping))
        );
        assert!(reader.read_frame().await.unwrap().is_none());
    }
}
