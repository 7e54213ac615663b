//! (b) restores timed to their first result, with the guest part broken
//! down; (j) what confinement costs a restore; (c) warm round trips with
//! the exits, interrupts and page faults behind them.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::run_python;
use super::stats::{self, ms, summarize};
use crate::sandbox::Sandbox;
use crate::template::Template;

pub(super) async fn restores(
    template: &Template,
    exe: &Path,
    count: usize,
) -> Result<(stats::Summary, stats::Summary, stats::Summary)> {
    let mut totals = Vec::new();
    let mut vmm_parts = Vec::new();
    let mut spawn_parts = Vec::new();
    let mut guest_parts = Vec::new();
    let mut connect_parts = Vec::new();
    let mut refresh_parts = Vec::new();
    let mut first_run_parts = Vec::new();
    let mut steps: Vec<(String, Vec<Duration>)> = Vec::new();
    for _ in 0..count.max(1) {
        let started = Instant::now();
        let sandbox = Sandbox::restore(template, exe).await?;
        let out = run_python(sandbox.client(), "print(1)").await?;
        let total = started.elapsed();
        if out.trim() != "1" {
            bail!("restored print(1) printed {out:?}");
        }
        let timing = sandbox.timing();
        totals.push(total);
        vmm_parts.push(timing.vm.vmm_setup);
        spawn_parts.push(timing.vm.spawn_to_running);
        guest_parts.push(total.saturating_sub(timing.vm.spawn_to_running));
        connect_parts.push(timing.agent_connect);
        refresh_parts.push(timing.refresh);
        first_run_parts.push(total.saturating_sub(timing.total));
        for (i, (name, us)) in sandbox.refresh_steps().iter().enumerate() {
            if steps.len() <= i {
                steps.push((name.clone(), Vec::new()));
            }
            steps[i].1.push(Duration::from_micros(*us));
        }
        sandbox.destroy().await;
    }
    let total = summarize(&totals).context("no samples")?;
    let vmm = summarize(&vmm_parts).context("no samples")?;
    println!("\n(b) restore to first print(1): {total}");
    println!(
        "    VMM part, process start to vCPUs running (host view): {}",
        summarize(&spawn_parts).context("no samples")?
    );
    println!("    VMM part, VMM main() to vCPUs running: {vmm}");
    println!(
        "    guest part (agent connect, refresh, first run): {}",
        summarize(&guest_parts).context("no samples")?
    );
    for (what, parts) in [
        (
            "agent connect (vCPUs running to the handshake)",
            &connect_parts,
        ),
        (
            "refresh (entropy, clock, interpreters reseeded)",
            &refresh_parts,
        ),
        ("first run_code after the restore", &first_run_parts),
    ] {
        println!("      {what}: {}", summarize(parts).context("no samples")?);
    }
    let steps: Vec<String> = steps
        .iter()
        .filter_map(|(name, samples)| {
            summarize(samples).map(|s| format!("{name} {}", ms(s.median)))
        })
        .collect();
    println!("      refresh in the guest, medians: {}", steps.join(", "));
    Ok((
        total,
        summarize(&spawn_parts).context("no samples")?,
        summarize(&guest_parts).context("no samples")?,
    ))
}

/// (j) What confinement costs a restore: the VMM's part with the jail and
/// seccomp, and with neither, alternating so that both see the same host.
pub(super) async fn confinement_cost(template: &Template, exe: &Path, count: usize) -> Result<()> {
    use crate::confinement::Confinement;
    let full = Confinement::current();
    if full.jail.is_none() {
        println!(
            "\n(j) confinement cost: skipped (the jail is off: {})",
            crate::confinement::ENV
        );
        return Ok(());
    }
    let off = Confinement {
        seccomp: false,
        seccomp_audit_only: false,
        jail: None,
    };
    let mut samples: [(Vec<Duration>, Vec<Duration>); 2] = Default::default();
    for _ in 0..count.max(1) {
        for (slot, policy) in [&full, &off].into_iter().enumerate() {
            let sandbox = Sandbox::restore_confined(template, exe, policy.clone()).await?;
            let timing = sandbox.timing();
            samples[slot].0.push(timing.vm.spawn_to_running);
            samples[slot].1.push(timing.vm.vmm_setup);
            sandbox.destroy().await;
        }
    }
    let [(jailed_host, jailed_vmm), (bare_host, bare_vmm)] = samples;
    let (jailed_host, bare_host) = (
        summarize(&jailed_host).context("no samples")?,
        summarize(&bare_host).context("no samples")?,
    );
    let (jailed_vmm, bare_vmm) = (
        summarize(&jailed_vmm).context("no samples")?,
        summarize(&bare_vmm).context("no samples")?,
    );
    println!("\n(j) confinement cost, VMM part of a restore (process start to vCPUs running)");
    println!("    jailed + seccomp: {jailed_host}");
    println!("    unconfined:       {bare_host}");
    println!(
        "    ratio jailed / unconfined: {:.2}x (VMM main() to vCPUs running: {} vs {}, {:.2}x)",
        jailed_host.median.as_secs_f64() / bare_host.median.as_secs_f64(),
        ms(jailed_vmm.median),
        ms(bare_vmm.median),
        jailed_vmm.median.as_secs_f64() / bare_vmm.median.as_secs_f64()
    );
    Ok(())
}

pub(super) async fn warm_round_trips(
    template: &Template,
    exe: &Path,
    rounds: usize,
) -> Result<stats::Summary> {
    let mut sandbox = Sandbox::restore(template, exe).await?;
    // Counted from the VMM's start: the restore's agent connect and refresh.
    let restored = sandbox.vm_mut().stats().await?;
    run_python(sandbox.client(), "print(1)").await?;
    // The guest's own background (its timer) over as long as the runs take.
    let before = sandbox.vm_mut().stats().await?;
    let mut samples = Vec::new();
    for _ in 0..rounds.max(1) {
        let started = Instant::now();
        let out = run_python(sandbox.client(), "print(1)").await?;
        samples.push(started.elapsed());
        if out.trim() != "1" {
            bail!("warm print(1) printed {out:?}");
        }
    }
    let busy = samples.iter().sum::<Duration>();
    let after = sandbox.vm_mut().stats().await?;
    let idle_before = sandbox.vm_mut().stats().await?;
    tokio::time::sleep(busy).await;
    let idle_after = sandbox.vm_mut().stats().await?;
    let n = samples.len() as f64;
    let exits = (after.exits_total - before.exits_total) as f64 / n;
    let irqs = (after.interrupts_injected - before.interrupts_injected) as f64 / n;
    let idle_exits = (idle_after.exits_total - idle_before.exits_total) as f64 / n;
    let summary = summarize(&samples).context("no samples")?;
    println!("\n(c) warm print(1) round trip: {summary}");
    println!(
        "    per round trip: {exits:.1} KVM exits, {irqs:.1} interrupts injected; idle guest over the same time: {idle_exits:.1} exits per round-trip-length"
    );
    println!(
        "    exits beyond the guest's own timer: {:.1} per round trip",
        exits - idle_exits
    );
    let mut by_reason: Vec<String> = after
        .exits
        .iter()
        .map(|(k, v)| {
            format!(
                "{k} {:.1}",
                (*v - before.exits.get(k).copied().unwrap_or(0)) as f64 / n
            )
        })
        .collect();
    by_reason.sort();
    println!(
        "    exits by reason per round trip: {}",
        by_reason.join(", ")
    );
    let kvm = |s: &crate::vmm::stats::Stats, name: &str| s.kvm.get(name).copied();
    match (kvm(&restored, "kvm_pf_taken"), kvm(&after, "kvm_pf_taken")) {
        (Some(at_restore), Some(last)) => {
            let first = kvm(&before, "kvm_pf_taken").unwrap_or(at_restore);
            let warm = last.saturating_sub(kvm(&before, "kvm_pf_taken").unwrap_or(last));
            let pages = |s| kvm(s, "kvm_pages_4k").unwrap_or(0);
            println!(
                "    KVM guest page faults (first touches of restored memory): {at_restore} during the restore's connect and refresh, {} in its first run, {:.1} per warm round trip; 4 KiB pages mapped: {} after the refresh, {} after the first run",
                first.saturating_sub(at_restore),
                warm as f64 / n,
                pages(&restored),
                pages(&before)
            );
        }
        _ => println!("    KVM guest page faults: not available (no KVM statistics interface)"),
    }
    let ws = restored.working_set;
    if ws.populated_pages + ws.prefaulted_pages > 0 {
        println!(
            "    template working set mapped before the vCPUs ran: {} pages copied for writing, {} pages pre-faulted into KVM, in {}",
            ws.populated_pages,
            ws.prefaulted_pages,
            ms(Duration::from_micros(ws.micros))
        );
    } else {
        println!(
            "    template working set: none mapped (the template has none, or this KVM cannot pre-fault)"
        );
    }
    sandbox.destroy().await;
    Ok(summary)
}
