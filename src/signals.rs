//! The one signal handler: SIGTERM and SIGINT, for the agent and the emulator.

use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::exit::Exit;

/// Which stop signal arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Term,
    Int,
}

impl StopSignal {
    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Term => "SIGTERM",
            StopSignal::Int => "SIGINT",
        }
    }
}

/// SIGTERM and SIGINT, watched from [`StopSignals::install`] on.
#[derive(Debug)]
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next SIGTERM or SIGINT.
    pub async fn next(&mut self) -> StopSignal {
        tokio::select! {
            _ = self.term.recv() => StopSignal::Term,
            _ = self.int.recv() => StopSignal::Int,
        }
    }
}

/// Waits for the first SIGTERM or SIGINT (the emulator's stop). Without the handlers, only
/// Ctrl-C stops it.
pub async fn first_stop() {
    match StopSignals::install() {
        Ok(mut signals) => {
            signals.next().await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot install the SIGTERM/SIGINT handlers; only Ctrl-C stops the emulator");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The agent's handler: SIGTERM or SIGINT cancels `shutdown` (the graceful shutdown); if it
/// outlasts the grace period by 5 s, or a second signal arrives, the process exits at once
/// (the ledger keeps everything).
pub async fn watch_agent(shutdown: CancellationToken, grace: Duration) {
    let Ok(mut signals) = StopSignals::install() else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    let first = signals.next().await;
    tracing::info!("{} received", first.name());
    shutdown.cancel();
    tokio::select! {
        _ = signals.next() => tracing::warn!("second signal: exiting now; unsent records stay in the ledger"),
        _ = tokio::time::sleep(grace + Duration::from_secs(5)) => tracing::error!("shutdown outlasted the grace period; exiting; unsent records stay in the ledger"),
    }
    std::process::exit(i32::from(Exit::Failure.as_code()));
}
