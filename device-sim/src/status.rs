//! The live one-line status of a running fleet, redrawn in place on the
//! terminal (hidden when standard error is not a terminal).

use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::fleet::{FleetSnapshot, FleetStats};

/// One status line for `s`.
pub fn line(s: &FleetSnapshot) -> String {
    format!(
        "connected {}/{}  subscribed {}  commands {} (ok {} failed {})  reports {}/{} acked  \
         reconnects {}  errors {}",
        s.connected,
        s.devices,
        s.subscribed,
        s.commands_received,
        s.results_succeeded,
        s.results_failed,
        s.reports_acked,
        s.reports_sent,
        s.connects.saturating_sub(s.initially_connected),
        s.connect_errors + s.subscriptions_refused + s.ignored_messages,
    )
}

/// A status line refreshed from `stats` four times a second until dropped.
#[derive(Debug)]
pub struct StatusLine {
    bar: ProgressBar,
    task: tokio::task::JoinHandle<()>,
}

impl StatusLine {
    /// Starts the line (a hidden one when `visible` is false).
    pub fn start(stats: Arc<FleetStats>, visible: bool) -> StatusLine {
        let bar = if visible {
            ProgressBar::new_spinner()
        } else {
            ProgressBar::hidden()
        };
        if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(250));
        let b = bar.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                b.set_message(line(&stats.snapshot()));
            }
        });
        StatusLine { bar, task }
    }

    /// Removes the line.
    pub fn finish(self) {
        self.task.abort();
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_the_counters() {
        let s = FleetSnapshot {
            devices: 10,
            connected: 9,
            connects: 12,
            initially_connected: 10,
            ..FleetSnapshot::default()
        };
        let l = line(&s);
        assert!(l.contains("connected 9/10"), "{l}");
        assert!(l.contains("reconnects 2"), "{l}");
    }
}
