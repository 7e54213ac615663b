//! The guest agent's operations, run locally: the agent in its debug mode
//! (`--serve-unix`) on this host, as the current user, without cgroups or
//! mounts. Fast checks of the protocol and the interpreters' behaviour
//! (numpy and friends may be missing here; the drivers cope). No KVM.

mod agent_support;
mod common;

use agent_support::*;

mod local {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Stdio};

    pub struct Local {
        pub client: AgentClient,
        pub dir: tempfile::TempDir,
        pub child: Child,
    }

    impl Drop for Local {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The agent binary: `$AIRLOCK_TEST_AGENT`, else the static one the image
    /// build makes from this workspace.
    fn agent_binary() -> PathBuf {
        if let Some(p) = std::env::var_os("AIRLOCK_TEST_AGENT") {
            return p.into();
        }
        common::image_dir();
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/agent/x86_64-unknown-linux-gnu/release/airlock-agent")
    }

    pub async fn start() -> Local {
        let l = start_with(None).await;
        let status = l
            .client
            .warm_status(Some(SHORT))
            .await
            .expect("warm status");
        assert!(status.all_warm(), "{status:?}");
        l
    }

    /// An agent honouring `image` as its image file (see the agent's
    /// `Config::debug`); its interpreters may still be starting.
    pub async fn start_with(image: Option<&serde_json::Value>) -> Local {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        let sock = dir.path().join("agent.sock");
        let mut cmd = std::process::Command::new(agent_binary());
        cmd.arg("--serve-unix")
            .arg(&sock)
            .arg("--home")
            .arg(&home)
            .stderr(Stdio::piped());
        if let Some(image) = image {
            let path = dir.path().join("image.json");
            std::fs::write(&path, image.to_string()).unwrap();
            cmd.env("AIRLOCK_IMAGE_CONFIG", &path);
        }
        // Started as `nohup` or a shell's `&` would start it: with SIGINT and
        // SIGQUIT ignored. Its interpreters must still be interruptible.
        // SAFETY: signal() is async-signal-safe; nothing else runs here.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::signal(libc::SIGINT, libc::SIG_IGN);
                libc::signal(libc::SIGQUIT, libc::SIG_IGN);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("the agent starts");
        // Wait for its "serving on" line, then echo the rest to our stderr.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stderr).lines();
            for line in lines.by_ref().map_while(Result::ok) {
                eprintln!("[agent] {line}");
                if line.contains("serving on") {
                    let _ = tx.send(());
                }
            }
        });
        tokio::task::spawn_blocking(move || rx.recv_timeout(SHORT))
            .await
            .unwrap()
            .expect("the agent serves");
        let client = AgentClient::connect_unix(&sock, SHORT)
            .await
            .expect("connect");
        Local { client, dir, child }
    }

    fn home(l: &Local) -> String {
        l.dir.path().join("home").to_string_lossy().into_owned()
    }

    #[test]
    fn exec_reports_exit_output_stdin_env_and_cwd() {
        RT.block_on(async {
            let l = start().await;
            let c = &l.client;
            let out = c.sh("echo out; echo err >&2; exit 3", SHORT).await.unwrap();
            assert_eq!(out.result.exit_code, Some(3));
            assert_eq!(
                (text(&out).as_str(), &out.stderr[..]),
                ("out\n", &b"err\n"[..])
            );
            assert!(!out.success());

            let mut exec = shell("cat; echo \"$GREETING $PWD\"", SHORT);
            exec.env = vec![("GREETING".into(), "hi".into())];
            exec.cwd = Some("/tmp".into());
            let out = c.exec(exec, b"from stdin\n".to_vec()).await.unwrap();
            assert!(out.success(), "{:?}", out.result);
            assert_eq!(text(&out), "from stdin\nhi /tmp\n");

            // argv form, relative cwd (inside the home), default cwd.
            let out = c
                .exec(
                    Exec {
                        command: Command::Argv(vec!["pwd".into()]),
                        cwd: None,
                        env: Vec::new(),
                        timeout_ms: None,
                        output: OutputLimits::default(),
                    },
                    Vec::new(),
                )
                .await
                .unwrap();
            assert_eq!(text(&out), format!("{}\n", home(&l)));

            // Clear errors for what cannot start.
            let err = c
                .exec(
                    Exec {
                        command: Command::Argv(vec!["no-such-command-x".into()]),
                        cwd: None,
                        env: Vec::new(),
                        timeout_ms: None,
                        output: OutputLimits::default(),
                    },
                    Vec::new(),
                )
                .await
                .unwrap_err();
            assert!(err.to_string().contains("command not found"), "{err}");
            let mut exec = shell("true", SHORT);
            exec.cwd = Some("/no/such/dir".into());
            let err = c.exec(exec, Vec::new()).await.unwrap_err();
            assert!(err.to_string().contains("does not exist"), "{err}");
        });
    }

    #[test]
    fn exec_timeout_kills_the_whole_group() {
        RT.block_on(async {
            let l = start().await;
            let c = &l.client;
            let marker = l.dir.path().join("survivor");
            // A background child that would write the marker after 3 s.
            let script = format!(
                "(sleep 3; touch {}) & echo started; sleep 60",
                marker.display()
            );
            let started = Instant::now();
            let out = c.sh(&script, Duration::from_millis(1500)).await.unwrap();
            assert!(out.result.timed_out, "{:?}", out.result);
            assert_eq!(out.result.signal, Some(libc::SIGKILL));
            assert_eq!(text(&out), "started\n");
            assert!(started.elapsed() < Duration::from_secs(5));
            // What a command leaves in the background ends with it too.
            let left = l.dir.path().join("left");
            let out = c
                .sh(
                    &format!("(sleep 2; touch {}) & echo bg", left.display()),
                    SHORT,
                )
                .await
                .unwrap();
            assert!(out.success() && text(&out) == "bg\n", "{:?}", out.result);
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert!(
                !marker.exists(),
                "the background child survived the timeout"
            );
            assert!(!left.exists(), "a background child outlived its exec");
        });
    }

    #[test]
    fn output_is_capped_with_totals_and_decoded_lossily() {
        RT.block_on(async {
            let l = start().await;
            let c = &l.client;
            let mut exec = shell(
                "head -c 1000000 /dev/zero | tr '\\0' a; echo end >&2",
                SHORT,
            );
            exec.output.stdout_max = Some(1000);
            let out = c.exec(exec, Vec::new()).await.unwrap();
            assert!(out.success());
            assert_eq!(out.stdout.len(), 1000);
            assert_eq!(out.result.stdout.total_bytes, 1_000_000);
            assert_eq!(out.result.stdout.kept_bytes, 1000);
            assert!(out.result.stdout.truncated() && !out.result.stderr.truncated());
            let t = out.stdout_text();
            assert!(t.truncated);
            assert!(
                t.text
                    .ends_with("[output truncated: showing the first 1000 of 1000000 bytes]\n")
            );
            assert_eq!(out.stderr, b"end\n");

            let out = c.sh("printf 'ok \\377\\376 end'", SHORT).await.unwrap();
            let t = out.stdout_text();
            assert!(t.lossy && !t.truncated);
            assert!(t.text.starts_with("ok \u{FFFD}\u{FFFD} end"), "{}", t.text);
            assert!(t.text.contains("not valid UTF-8"));

            // A character cut in half by the limit is not called invalid.
            let mut exec = shell("printf 'a\\303\\251b'", SHORT);
            exec.output.stdout_max = Some(2);
            let t = c.exec(exec, Vec::new()).await.unwrap().stdout_text();
            assert!(!t.lossy && t.truncated, "{t:?}");
            assert!(t.text.starts_with("a\n[output truncated"), "{}", t.text);

            let mut exec = shell("true", SHORT);
            exec.output.stdout_max = Some(u64::MAX);
            let err = c.exec(exec, Vec::new()).await.unwrap_err();
            assert!(err.to_string().contains("exceeds the maximum"), "{err}");
        });
    }

    #[test]
    fn two_requests_in_flight_and_cancelling_one() {
        RT.block_on(async {
            let l = start().await;
            let c = &l.client;
            let slow = c
                .start_exec(
                    shell("echo slow-start; sleep 30; echo slow-end", SHORT),
                    Vec::new(),
                )
                .await
                .unwrap();
            let fast = c
                .start_exec(shell("sleep 1; echo fast", SHORT), Vec::new())
                .await
                .unwrap();
            let cancel_after_fast = async {
                let out = fast.finish_exec(|_| {}).await.unwrap();
                assert_eq!(text(&out), "fast\n");
                Instant::now()
            };
            let mut events = Vec::new();
            let started = Instant::now();
            let (fast_done, slow_out) = tokio::join!(cancel_after_fast, async {
                // Cancel once the fast one has had time to finish.
                tokio::time::sleep(Duration::from_secs(2)).await;
                slow.cancel().await.unwrap();
                slow.finish_exec(|e| events.push(e.clone())).await.unwrap()
            });
            assert!(slow_out.result.cancelled, "{:?}", slow_out.result);
            assert!(!slow_out.result.timed_out);
            assert_eq!(text(&slow_out), "slow-start\n");
            assert!(
                matches!(
                    &events[..],
                    [Event::Output {
                        stream: Stream::Stdout,
                        ..
                    }]
                ),
                "{events:?}"
            );
            assert!(fast_done - started < Duration::from_secs(2));
            assert!(started.elapsed() < Duration::from_secs(10));

            // A dropped call is cancelled too: its process goes away.
            let marker = l.dir.path().join("dropped");
            let call = c
                .start_exec(
                    shell(&format!("sleep 2; touch {}", marker.display()), SHORT),
                    Vec::new(),
                )
                .await
                .unwrap();
            drop(call);
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert!(!marker.exists(), "a dropped call kept running");
            assert!(c.ping().await.is_ok());
        });
    }

    #[test]
    fn python_keeps_state_like_a_notebook() {
        RT.block_on(async {
            let l = start().await;
            check_python_state(&l.client, SHORT).await;
        });
    }

    #[test]
    fn python_details() {
        RT.block_on(async {
            let l = start().await;
            let c = &l.client;
            // Subprocess output is captured; output order within a stream holds.
            let out = run(c, Language::Python, "import subprocess\nprint('a', flush=True)\nsubprocess.run(['echo', 'b'])\nprint('c')", SHORT).await;
            assert_ok(&out, "subprocess");
            assert_eq!(run_text(&out), "a\nb\nc\n");
            // exit() ends the cell, not the interpreter.
            let out = run(c, Language::Python, "z = 3\nimport sys\nsys.exit(4)", SHORT).await;
            assert_eq!(out.result.process.exit_code, Some(4));
            assert!(!out.result.state_lost);
            let out = run(c, Language::Python, "z", SHORT).await;
            assert_eq!(run_text(&out), "3\n");
            // A dead interpreter is replaced, and the result says the state is gone.
            let out = run(c, Language::Python, "import os; os._exit(9)", SHORT).await;
            assert!(out.result.state_lost, "{:?}", out.result);
            assert_eq!(out.result.process.exit_code, Some(9));
            let out = run(c, Language::Python, "'z' in globals()", SHORT).await;
            assert_eq!(run_text(&out), "False\n");
            // Functions defined in cells pickle (they live in __main__).
            let out = run(c, Language::Python, "import pickle\ndef g(): return 1\npickle.loads(pickle.dumps(g))()", SHORT).await;
            assert_eq!(run_text(&out), "1\n", "{:?}", String::from_utf8_lossy(&out.stderr));
            // Code that is not UTF-8, or too big, is refused.
            let run_code = |code: Vec<u8>| async move {
                let r = RunCode {
                    language: Language::Python,
                    timeout_ms: None,
                    output: OutputLimits::default(),
                };
                c.start_run_code(r, code).await.unwrap().finish_run(|_| {}).await
            };
            let err = run_code(b"\xff".to_vec()).await.unwrap_err();
            assert!(err.to_string().contains("UTF-8"), "{err}");
            let err = run_code(vec![b'#'; (1 << 20) + 1]).await.unwrap_err();
            assert!(matches!(err, airlock::agent_client::AgentError::Remote { code: ErrorCode::TooLarge, .. }), "{err}");
        });
    }

    #[test]
    fn python_timeout_interrupts_and_keeps_state() {
        RT.block_on(async {
            let l = start().await;
            check_python_timeout(&l.client).await;
            // A cell that ignores SIGINT is killed after the grace period;
            // the state is lost and a fresh interpreter answers next.
            let c = &l.client;
            run(c, Language::Python, "lost = 1", SHORT).await;
            let code = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: time.sleep(0.1)";
            let out = run(c, Language::Python, code, Duration::from_secs(1)).await;
            assert!(out.result.process.timed_out && out.result.state_lost, "{:?}", out.result);
            let out = run(c, Language::Python, "'lost' in globals()", SHORT).await;
            assert_eq!(run_text(&out), "False\n");
        });
    }

    #[test]
    fn javascript_keeps_state() {
        RT.block_on(async {
            let l = start().await;
            check_javascript_state(&l.client, SHORT).await;
            let c = &l.client;
            // A busy loop is broken off at the timeout; the context survives.
            run(c, Language::Javascript, "var keep = 'kept'", SHORT).await;
            let out = run(c, Language::Javascript, "while (true) {}", Duration::from_secs(1)).await;
            assert!(out.result.process.timed_out && !out.result.state_lost, "{:?}", out.result);
            let out = run(c, Language::Javascript, "keep", SHORT).await;
            assert_eq!(run_text(&out), "'kept'\n");
            // Math.random comes from the CSPRNG and looks uniform.
            let out = run(c, Language::Javascript, "let s = 0; for (let i = 0; i < 10000; i++) s += Math.random(); Math.abs(s / 10000 - 0.5) < 0.02", SHORT).await;
            assert_eq!(run_text(&out), "true\n");
        });
    }

    #[test]
    fn bash_session_persists() {
        RT.block_on(async {
            let l = start().await;
            let c = &l.client;
            check_bash_session(c, SHORT).await;
            // `exit` ends the session; the next call gets a fresh one.
            let out = run(c, Language::Bash, "exit 5", SHORT).await;
            assert_eq!(out.result.process.exit_code, Some(5));
            assert!(out.result.state_lost);
            let out = run(c, Language::Bash, "echo ${AIRLOCK_T:-gone}", SHORT).await;
            assert_eq!(run_text(&out), "gone\n");
            // A stray `break` or `continue` does not break the session.
            let out = run(c, Language::Bash, "v=1; break; echo no", SHORT).await;
            assert!(!out.result.state_lost);
            let out = run(c, Language::Bash, "continue", SHORT).await;
            assert!(!out.result.state_lost);
            let out = run(c, Language::Bash, "echo $v", SHORT).await;
            assert_eq!(run_text(&out), "1\n");
            // Timeouts interrupt the cell; the shell survives.
            let started = Instant::now();
            let out = run(c, Language::Bash, "sleep 30", Duration::from_secs(1)).await;
            assert!(
                out.result.process.timed_out && !out.result.state_lost,
                "{:?}",
                out.result
            );
            assert!(started.elapsed() < Duration::from_secs(3));
            let out = run(c, Language::Bash, "echo $v", SHORT).await;
            assert_eq!(run_text(&out), "1\n");
        });
    }

    #[test]
    fn files_round_trip_and_fail_clearly() {
        RT.block_on(async {
            let l = start().await;
            let c = &l.client;
            let home = home(&l);
            let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
            let w = WriteFile {
                path: "sub/dir/data.bin".into(),
                mode: Some(0o600),
                create_parents: true,
                append: false,
            };
            let st = c.write_file(w, data.clone()).await.unwrap();
            assert_eq!(
                (st.size, st.mode, st.kind),
                (data.len() as u64, 0o600, FileKind::File)
            );
            assert_eq!(st.path, format!("{home}/sub/dir/data.bin"));
            assert!(c.read_file("sub/dir/data.bin", 1 << 30).await.unwrap() == data);
            let (meta, part) = c
                .read_file_range("sub/dir/data.bin", 10, Some(5))
                .await
                .unwrap();
            assert_eq!(
                (part.as_slice(), meta.eof, meta.size),
                (&data[10..15], false, data.len() as u64)
            );
            let (meta, part) = c
                .read_file_range("sub/dir/data.bin", data.len() as u64 - 2, None)
                .await
                .unwrap();
            assert_eq!((part.len(), meta.eof), (2, true));

            let w = WriteFile {
                path: "sub/dir/data.bin".into(),
                mode: None,
                create_parents: false,
                append: true,
            };
            assert_eq!(
                c.write_file(w, b"xy".to_vec()).await.unwrap().size,
                data.len() as u64 + 2
            );

            let list = c
                .list_files(ListFiles {
                    path: "sub".into(),
                    recursive: true,
                    max_depth: None,
                    max_entries: None,
                })
                .await
                .unwrap();
            let names: Vec<&str> = list.entries.iter().map(|e| e.path.as_str()).collect();
            assert_eq!(
                names,
                [
                    format!("{home}/sub/dir"),
                    format!("{home}/sub/dir/data.bin")
                ]
            );
            assert!(!list.truncated);
            let one = c
                .list_files(ListFiles {
                    path: "sub".into(),
                    recursive: false,
                    max_depth: None,
                    max_entries: None,
                })
                .await
                .unwrap();
            assert_eq!(one.entries.len(), 1);
            assert_eq!(one.entries[0].kind, FileKind::Dir);

            let remote_code = |e: airlock::agent_client::AgentError| match e {
                airlock::agent_client::AgentError::Remote { code, message } => (code, message),
                other => panic!("{other}"),
            };
            let (code, msg) = remote_code(c.stat_file("nope").await.unwrap_err());
            assert_eq!(code, ErrorCode::NotFound, "{msg}");
            let (code, msg) = remote_code(c.remove_file("sub", false).await.unwrap_err());
            assert_eq!(code, ErrorCode::BadRequest);
            assert!(msg.contains("not empty"), "{msg}");
            let (code, _) = remote_code(c.read_file_range("sub", 0, None).await.unwrap_err());
            assert_eq!(code, ErrorCode::BadRequest);
            c.remove_file("sub", true).await.unwrap();
            let (code, _) = remote_code(c.stat_file("sub").await.unwrap_err());
            assert_eq!(code, ErrorCode::NotFound);
        });
    }

    #[test]
    fn refresh_reseeds_what_it_may() {
        RT.block_on(async {
            let l = start().await;
            let c = &l.client;
            let before = run(c, Language::Python, "import random; random.random()", SHORT).await;
            assert_ok(&before, "random");
            let reply = c.refresh(None, vec![7; 64]).await.unwrap();
            // Unprivileged here: no credit, no clock, but the interpreters reseed.
            assert_eq!(reply.entropy_bytes, 0);
            let mut langs = reply.reseeded.clone();
            langs.sort();
            assert_eq!(
                langs,
                [Language::Python, Language::Javascript, Language::Bash],
                "{reply:?}"
            );
            let out = run(c, Language::Bash, "echo $RANDOM", SHORT).await;
            assert_ok(&out, "bash after reseed");
        });
    }

    /// Guest system calls per run_code round trip, measured with strace on
    /// the agent and the interpreters of a debug-mode agent. Prints a table.
    #[test]
    #[ignore = "measurement: needs strace; run with --ignored --nocapture"]
    fn syscalls_per_round_trip() {
        RT.block_on(async {
            let l = start().await;
            let c = &l.client;
            let agent = l.child.id();
            let children = std::fs::read_to_string(format!("/proc/{agent}/task/{agent}/children"))
                .unwrap_or_default();
            let pids: Vec<String> = children.split_whitespace().map(String::from).collect();
            let comm = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            const N: usize = 50;
            for (lang, code) in [
                (Language::Python, "x = 6 * 7\nprint(x)"),
                (Language::Bash, "echo hi"),
                (Language::Javascript, "console.log(6 * 7)"),
            ] {
                // Warm the path once.
                run(c, lang, code, SHORT).await;
                let name = match lang { Language::Python => "python3", Language::Bash => "bash", _ => "node" };
                let interp = pids.iter().find(|p| comm(p).trim() == name).expect("interpreter pid").clone();
                let out = l.dir.path().join(format!("strace-{name}.txt"));
                let detail = std::env::var_os("AIRLOCK_STRACE_DETAIL").is_some();
                let mut strace = std::process::Command::new("strace")
                    .args(["-f", "-qq", if detail { "-tt" } else { "-c" }, "-o"])
                    .arg(&out)
                    .args(["-p", &agent.to_string(), "-p", &interp])
                    .spawn()
                    .expect("strace runs");
                // strace attaches within a moment; a ping is the marker.
                tokio::time::sleep(Duration::from_secs(1)).await;
                let base_started = Instant::now();
                for _ in 0..N {
                    c.ping().await.unwrap();
                }
                let ping_time = base_started.elapsed();
                let started = Instant::now();
                for _ in 0..N {
                    let r = run(c, lang, code, SHORT).await;
                    assert_ok(&r, "measured call");
                }
                let took = started.elapsed();
                // SAFETY: signalling the strace we started.
                unsafe { libc::kill(strace.id() as i32, libc::SIGINT) };
                strace.wait().unwrap();
                let table = std::fs::read_to_string(&out).unwrap();
                let total: u64 = table
                    .lines()
                    .find(|l| l.trim_end().ends_with("total"))
                    .and_then(|l| l.split_whitespace().nth(3))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                eprintln!(
                    "{name}: {N} pings then {N} run_code round trips; {total} system calls in all \
                     (agent + interpreter); run_code {:.2} ms each on this host; ping {:.2} ms\n{table}",
                    took.as_secs_f64() * 1000.0 / N as f64,
                    ping_time.as_secs_f64() * 1000.0 / N as f64,
                );
            }
        });
    }

    /// A program's absolute path, from this process's PATH.
    fn in_path(name: &str) -> String {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("{name} is not in PATH"))
            .to_string_lossy()
            .into_owned()
    }

    fn remote_error(e: airlock::agent_client::AgentError) -> (ErrorCode, String) {
        match e {
            airlock::agent_client::AgentError::Remote { code, message } => (code, message),
            other => panic!("not an error from the agent: {other}"),
        }
    }

    /// A custom image's settings: python where the image says, its modules
    /// imported before "ready" (one missing: a note), its env for all user
    /// code but not the agent's plumbing, no node (refused by name), and
    /// bash started on first use.
    #[test]
    fn image_file_sets_env_imports_and_languages() {
        RT.block_on(async {
            let image = serde_json::json!({
                "name": "local-test",
                "python": in_path("python3"),
                "node": null,
                "warm": ["python"],
                "python_imports": ["xml.dom.minidom", "airlock_no_such_module"],
                "env": {"IMAGE_GREETING": "hello from the image", "HOME": "/refused"},
            });
            let l = start_with(Some(&image)).await;
            let c = &l.client;
            let status = c.warm_status(Some(SHORT)).await.unwrap();
            assert!(status.settled(), "{status:?}");
            let python = status.get(Language::Python).unwrap();
            assert_eq!(python.state, InterpreterState::Warm, "{python:?}");
            let detail = python.detail.as_deref().unwrap_or_default();
            assert!(detail.contains("airlock_no_such_module"), "{detail}");
            let node = status.get(Language::Javascript).unwrap();
            assert_eq!(node.state, InterpreterState::Unavailable, "{node:?}");
            assert!(node.detail.as_deref().unwrap_or_default().contains("has no node"), "{node:?}");
            let bash = status.get(Language::Bash).unwrap();
            assert_eq!((bash.state, bash.starts), (InterpreterState::Stopped, 0), "{bash:?}");

            let code = "import os, sys, subprocess\n\
                        print(os.environ['IMAGE_GREETING'], os.environ['HOME'] == os.getcwd())\n\
                        print('AIRLOCK_PYTHON_IMPORTS' in os.environ, 'xml.dom.minidom' in sys.modules, flush=True)\n\
                        _ = subprocess.run(['sh', '-c', 'echo ${AIRLOCK_PYTHON_IMPORTS:-clean}'])";
            let out = run(c, Language::Python, code, SHORT).await;
            assert_ok(&out, "python in the image");
            assert_eq!(run_text(&out), "hello from the image True\nFalse True\nclean\n");

            let err = c.run_code(Language::Javascript, "1", SHORT).await.unwrap_err();
            let (code, message) = remote_error(err);
            assert_eq!(code, ErrorCode::Unsupported);
            assert_eq!(
                message,
                "this image (local-test) has no node (javascript); its languages are python, bash"
            );
            let (code, _) = remote_error(c.reset(Some(Language::Javascript)).await.unwrap_err());
            assert_eq!(code, ErrorCode::Unsupported);
            c.reset(None).await.unwrap();

            // Not warmed: bash starts on its first call.
            let out = run(c, Language::Bash, "echo $IMAGE_GREETING", SHORT).await;
            assert_eq!(run_text(&out), "hello from the image\n");
            let status = c.warm_status(None).await.unwrap();
            assert_eq!(status.get(Language::Bash).unwrap().state, InterpreterState::Warm);
            let out = c.sh("echo $IMAGE_GREETING; echo $HOME", SHORT).await.unwrap();
            assert_eq!(text(&out), format!("hello from the image\n{}\n", home(&l)));
        });
    }

    /// Without bash, a shell command is refused by name; argv still runs.
    #[test]
    fn image_without_bash_or_node() {
        RT.block_on(async {
            let image = serde_json::json!({"bash": null, "node": null, "warm": []});
            let l = start_with(Some(&image)).await;
            let c = &l.client;
            let status = c.warm_status(Some(SHORT)).await.unwrap();
            assert!(status.settled(), "{status:?}");
            assert_eq!(
                status.get(Language::Python).unwrap().state,
                InterpreterState::Stopped
            );
            assert_eq!(
                status.get(Language::Bash).unwrap().state,
                InterpreterState::Unavailable
            );
            let (code, message) = remote_error(c.sh("true", SHORT).await.unwrap_err());
            assert_eq!(code, ErrorCode::Unsupported);
            assert!(message.contains("this image has no bash"), "{message}");
            assert!(message.contains("its languages are python"), "{message}");
            let out = c
                .exec(
                    Exec {
                        command: Command::Argv(vec!["echo".into(), "argv".into()]),
                        cwd: None,
                        env: Vec::new(),
                        timeout_ms: None,
                        output: OutputLimits::default(),
                    },
                    Vec::new(),
                )
                .await
                .unwrap();
            assert_eq!(text(&out), "argv\n");
            let out = run(c, Language::Python, "print(6 * 7)", SHORT).await;
            assert_eq!(run_text(&out), "42\n");
        });
    }

    #[test]
    fn warm_status_reports_each_interpreter() {
        RT.block_on(async {
            let l = start().await;
            let status = l.client.warm_status(None).await.unwrap();
            for lang in Language::ALL {
                let s = status
                    .get(lang)
                    .unwrap_or_else(|| panic!("{lang:?} missing"));
                assert_eq!(s.state, InterpreterState::Warm, "{s:?}");
                assert_eq!(s.starts, 1);
                assert!(s.warm_after_ms.is_some());
            }
        });
    }
}

// ---------------------------------------------------------------------------
// Real microVMs.
