//! Following a job (`--job` of `device-sim run`): its progress, read from
//! `GET /v1/jobs/{id}` while the fleet answers its commands.

use std::time::Duration;

use anyhow::Result;
use serde_json::Value;

use crate::rest::Api;

/// Whether a job (as `GET /v1/jobs/{id}` returns it) is over.
pub fn is_over(job: &Value) -> bool {
    matches!(
        job["state"].as_str(),
        Some("completed" | "canceled" | "aborted")
    )
}

/// One line of progress: state, launched of all, and the counts.
pub fn progress_line(job: &Value) -> String {
    let c = &job["counts"];
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    let mut s = format!(
        "job {}: {}, launched {}/{}, in progress {}, succeeded {}, failed {}, timed out {}, \
         canceled {}",
        job["id"].as_str().unwrap_or("?"),
        job["state"].as_str().unwrap_or("?"),
        job["launched"].as_u64().unwrap_or(0),
        job["devices"].as_u64().unwrap_or(0),
        n("in_progress"),
        n("succeeded"),
        n("failed"),
        n("timed_out"),
        n("canceled"),
    );
    if let Some(reason) = job["reason"].as_str() {
        s.push_str(&format!(" ({reason})"));
    }
    s
}

/// Reads job `id` every `every`, printing a progress line to stderr when
/// it changed, until it is over; returns it then. A failed read is
/// reported and tried again at the next turn.
pub async fn follow(api: &Api, id: &str, every: Duration) -> Result<Value> {
    let mut last = String::new();
    loop {
        match api.job(id).await {
            Ok(job) => {
                let line = progress_line(&job);
                if line != last {
                    eprintln!("device-sim: {line}");
                    last = line;
                }
                if is_over(&job) {
                    return Ok(job);
                }
            }
            Err(e) => eprintln!("device-sim: warning: reading job {id}: {e:#}"),
        }
        tokio::time::sleep(every).await;
    }
}

/// How long a finished job's rollout took against the time its rate
/// implies.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RolloutTiming {
    /// Executions launched.
    pub launched: u64,
    /// From the job's start to its end, seconds.
    pub took_secs: f64,
    /// What `max_per_minute` implies for `launched` executions: one at
    /// once, then the rate — `(launched − 1) / rate`, seconds.
    pub implied_secs: f64,
}

impl RolloutTiming {
    /// One line for the summary.
    pub fn line(&self) -> String {
        let over = if self.implied_secs > 0.0 {
            format!(
                " ({:+.1} %)",
                (self.took_secs / self.implied_secs - 1.0) * 100.0
            )
        } else {
            String::new()
        };
        format!(
            "rollout          {} launched in {:.2} s; the rate implies {:.2} s{over}",
            self.launched, self.took_secs, self.implied_secs
        )
    }
}

/// The timing of a job that started and finished (`None` otherwise).
pub fn rollout_timing(job: &Value) -> Option<RolloutTiming> {
    let started = job["started_at"].as_u64()?;
    let finished = job["finished_at"].as_u64()?;
    let rate = job["rollout"]["max_per_minute"]
        .as_u64()
        .filter(|r| *r > 0)?;
    let launched = job["launched"].as_u64()?;
    Some(RolloutTiming {
        launched,
        took_secs: finished.saturating_sub(started) as f64 / 1000.0,
        implied_secs: launched.saturating_sub(1) as f64 * 60.0 / rate as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn progress_names_the_state_the_launches_and_the_counts() {
        let job = json!({"id": "j-1", "state": "aborted", "launched": 30, "devices": 100,
            "reason": "12 of 20 finished executions failed or timed out, more than 50 %",
            "counts": {"queued": 0, "in_progress": 10, "succeeded": 8, "failed": 12,
                "timed_out": 0, "canceled": 70}});
        let line = progress_line(&job);
        assert_eq!(
            line,
            "job j-1: aborted, launched 30/100, in progress 10, succeeded 8, failed 12, \
             timed out 0, canceled 70 (12 of 20 finished executions failed or timed out, more \
             than 50 %)"
        );
        assert!(is_over(&job));
        assert!(!is_over(&json!({"state": "in_progress"})));
        assert!(!is_over(&json!({})));
    }

    #[test]
    fn a_rollouts_time_is_set_against_what_its_rate_implies() {
        let job = json!({"started_at": 1_000, "finished_at": 11_500, "launched": 101,
            "rollout": {"max_per_minute": 600}});
        let t = rollout_timing(&job).expect("timing");
        assert_eq!((t.took_secs, t.implied_secs), (10.5, 10.0));
        assert_eq!(
            t.line(),
            "rollout          101 launched in 10.50 s; the rate implies 10.00 s (+5.0 %)"
        );
        assert_eq!(rollout_timing(&json!({"started_at": 1})), None);
    }
}
