//! `device-sim/README.md` run as written against a gateway started as the
//! main README starts it (in this process, on free ports, its data in the
//! script's directory), with this crate's `device-sim`; device counts,
//! rates and durations are capped to keep CI fast. See
//! `gateway/tests/support/readme.rs`.

#[path = "../../gateway/tests/support/readme.rs"]
mod readme;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_device_sim_commands_work() {
    let runner = readme::Runner::new(
        "device-sim/README.md",
        "device-sim",
        &[("device-sim", env!("CARGO_BIN_EXE_device-sim"))],
    )
    .cap("--devices", 20.0)
    .cap("--clients", 10.0)
    .cap("--rate", 50.0)
    .cap("--duration-secs", 2.0);
    let at = |port| {
        format!("127.0.0.1:{}", runner.port(port))
            .parse()
            .expect("addr")
    };
    let mut config = gateway::Config::single(runner.dir().join("data"), at(8080), at(7000));
    config.mqtt_listen = Some(at(1883));
    config.mqtt5_listen = Some(at(1884));
    let gw = gateway::start(config).await.expect("start the gateway");
    let out = tokio::task::spawn_blocking(move || runner.run())
        .await
        .expect("the README run");
    gw.stop().await;
    // run, bench and ingest each printed their report.
    assert!(out.contains("devices ready"), "{out}");
    assert!(out.contains("devices connected"), "{out}");
}
