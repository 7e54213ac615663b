//! The airlock guest agent. It runs as PID 1 inside each microVM.

fn main() {
    if std::env::args().any(|a| a == "--version") {
        println!(
            "airlock-agent {} (protocol {})",
            env!("CARGO_PKG_VERSION"),
            airlock_protocol::PROTOCOL_VERSION
        );
    }
}
