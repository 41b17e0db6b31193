//! The device endpoint's counters: the endpoint counts, `/metrics` renders
//! them and the health checks read them.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of the MQTT side, rendered on `/metrics`.
#[derive(Debug, Default)]
pub struct MqttStats {
    /// Device sessions open on this gateway.
    pub sessions: AtomicU64,
    /// Device messages read and not yet answered (their proposal not yet
    /// committed).
    pub messages_uncommitted: AtomicU64,
    /// Times a device connection stopped reading because its window of
    /// unanswered messages or the endpoint's pipeline was full.
    pub reads_paused: AtomicU64,
    /// Device connections closed because a message could not be committed
    /// in time (it was not acknowledged; the device sends it again).
    pub not_committed: AtomicU64,
    /// Device sessions started since boot.
    pub sessions_started: AtomicU64,
    /// Logins refused.
    pub auth_failures: AtomicU64,
    /// Devices disconnected for publishing or subscribing outside their topics.
    pub acl_violations: AtomicU64,
    /// Connections closed for a malformed or oversize packet.
    pub malformed_packets: AtomicU64,
    /// Device messages ignored (unknown or foreign command, malformed JSON,
    /// oversize payload).
    pub ignored_messages: AtomicU64,
    /// Commands published to devices.
    pub commands_published: AtomicU64,
    /// PUBLISH packets received from logged-in devices (every one read,
    /// before its topic is checked: the device messages a second on the
    /// console's live view).
    pub publishes_received: AtomicU64,
    /// Reported-state patches received from devices (before coalescing).
    pub reports_received: AtomicU64,
    /// `ReportState` proposals made from them (after coalescing).
    pub report_proposals: AtomicU64,
    /// `accepted` messages answered by their command's result, without an
    /// entry of their own.
    pub accepted_folded: AtomicU64,
    /// Commands whose `sent` was not proposed because their device answered
    /// before it was due.
    pub sent_skipped: AtomicU64,
    /// Commands delivered again to a device connected here because they
    /// waited too long for it.
    pub commands_redelivered: AtomicU64,
    /// Connections closed for a protocol violation (a second CONNECT, a
    /// server's packet from a device).
    pub protocol_violations: AtomicU64,
    /// Logins refused unchecked because the address or device id had too
    /// many failed logins.
    pub logins_throttled: AtomicU64,
    /// Connections closed at once because the connection limit was reached.
    pub connections_refused: AtomicU64,
    /// Errors accepting a connection (such as running out of descriptors).
    pub accept_errors: AtomicU64,
    /// Device listeners that stopped while the gateway runs (health fails).
    pub listeners_down: AtomicU64,
    /// Messages not sent because they were larger than the device's MQTT 5
    /// Maximum Packet Size.
    pub messages_too_large: AtomicU64,
    /// TLS handshakes on the device listener that failed or did not finish
    /// within the connect deadline (clients that closed are not counted).
    pub tls_handshake_failures: AtomicU64,
}

impl MqttStats {
    /// Appends the counters in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let rows: [(&str, &str, &str, &AtomicU64); 23] = [
            (
                "entente_mqtt_sessions",
                "gauge",
                "Device sessions open on this gateway.",
                &self.sessions,
            ),
            (
                "entente_mqtt_messages_uncommitted",
                "gauge",
                "Device messages read and not yet acknowledged: their proposals are not committed yet.",
                &self.messages_uncommitted,
            ),
            (
                "entente_mqtt_reads_paused_total",
                "counter",
                "Times a device connection stopped reading: its window of unacknowledged messages or the pipeline was full.",
                &self.reads_paused,
            ),
            (
                "entente_mqtt_not_committed_total",
                "counter",
                "Device connections closed because a message could not be committed in time (not acknowledged).",
                &self.not_committed,
            ),
            (
                "entente_mqtt_sessions_started_total",
                "counter",
                "Device sessions started.",
                &self.sessions_started,
            ),
            (
                "entente_mqtt_auth_failures_total",
                "counter",
                "MQTT logins refused.",
                &self.auth_failures,
            ),
            (
                "entente_mqtt_acl_violations_total",
                "counter",
                "Devices disconnected for using another device's topics.",
                &self.acl_violations,
            ),
            (
                "entente_mqtt_malformed_packets_total",
                "counter",
                "Connections closed for a malformed or oversize packet.",
                &self.malformed_packets,
            ),
            (
                "entente_mqtt_ignored_messages_total",
                "counter",
                "Device messages ignored (unknown command, malformed, oversize).",
                &self.ignored_messages,
            ),
            (
                "entente_mqtt_commands_published_total",
                "counter",
                "Commands published to devices.",
                &self.commands_published,
            ),
            (
                "entente_mqtt_publishes_received_total",
                "counter",
                "MQTT PUBLISH packets received from devices.",
                &self.publishes_received,
            ),
            (
                "entente_mqtt_reports_received_total",
                "counter",
                "Reported-state patches received from devices.",
                &self.reports_received,
            ),
            (
                "entente_mqtt_report_proposals_total",
                "counter",
                "Reported-state proposals made from them after coalescing.",
                &self.report_proposals,
            ),
            (
                "entente_mqtt_accepted_folded_total",
                "counter",
                "Device accepted messages committed with their command's result, not on their own.",
                &self.accepted_folded,
            ),
            (
                "entente_mqtt_sent_skipped_total",
                "counter",
                "Commands whose sent step was not proposed because the device answered first.",
                &self.sent_skipped,
            ),
            (
                "entente_mqtt_commands_redelivered_total",
                "counter",
                "Commands delivered again to a device connected here after waiting too long.",
                &self.commands_redelivered,
            ),
            (
                "entente_mqtt_protocol_violations_total",
                "counter",
                "Connections closed for a protocol violation (such as a second CONNECT).",
                &self.protocol_violations,
            ),
            (
                "entente_mqtt_logins_throttled_total",
                "counter",
                "Logins refused unchecked after too many failures from the address or for the id.",
                &self.logins_throttled,
            ),
            (
                "entente_mqtt_connections_refused_total",
                "counter",
                "Connections closed at once because the connection limit was reached.",
                &self.connections_refused,
            ),
            (
                "entente_mqtt_accept_errors_total",
                "counter",
                "Errors accepting device connections (such as running out of descriptors).",
                &self.accept_errors,
            ),
            (
                "entente_mqtt_listeners_down",
                "gauge",
                "Device listeners that stopped while the gateway runs.",
                &self.listeners_down,
            ),
            (
                "entente_mqtt_messages_too_large_total",
                "counter",
                "Messages not sent: larger than the device's Maximum Packet Size.",
                &self.messages_too_large,
            ),
            (
                "entente_mqtt_tls_handshake_failures_total",
                "counter",
                "TLS handshakes of device connections that failed or did not finish in time.",
                &self.tls_handshake_failures,
            ),
        ];
        for (name, kind, help, v) in rows {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
    }
}
