//! How a well-behaved test device answers a command: `accepted`, then a
//! `succeeded` result (shared by the console, jobs and failover-delivery
//! tests).

use entente_protocol::{CommandResultMessage, ResultStatus, accepted_topic, result_topic};
use rumqttc::{AsyncClient, QoS};
use serde_json::json;

/// Publishes `accepted` and a `succeeded` result for `command` of
/// `device`, on a task of its own: not from the polling task, whose event
/// loop empties the request queue a full queue would otherwise block.
pub fn answer_succeeded(client: &AsyncClient, device: &str, command: &str) {
    let result = CommandResultMessage {
        status: ResultStatus::Succeeded,
        output: json!({"ok": true}),
    };
    let result = serde_json::to_vec(&result).expect("result");
    let (c, device, command) = (client.clone(), device.to_owned(), command.to_owned());
    tokio::spawn(async move {
        let _ = c
            .publish(
                accepted_topic(&device, &command),
                QoS::AtLeastOnce,
                false,
                "{}",
            )
            .await;
        let _ = c
            .publish(
                result_topic(&device, &command),
                QoS::AtLeastOnce,
                false,
                result,
            )
            .await;
    });
}
