//! Config parsing, overlay and validation.

use super::mqtt::{parse_broker_arg, parse_mappings};
use super::*;
use crate::broker::BrokerUrl;
use crate::names::{DEFAULT_TAINT, TaintEffect};

fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
    let mut c = AgentConfig::from_toml(text, Path::new("/etc/lichen/config.toml"))?;
    c.finish()?;
    Ok(c)
}

#[test]
fn empty_file_gives_documented_defaults() {
    let c = parse("node_name = \"pi-07\"").expect("valid");
    assert_eq!(c.state_dir, Path::new("/var/lib/lichen"));
    assert_eq!(c.static_pods(), Some(Path::new("/etc/lichen/pods")));
    assert_eq!(c.max_pods, 110);
    assert_eq!(c.runtime.default_memory_limit, ByteSize(128 << 20));
    assert_eq!(c.container_logs.max_size, ByteSize(10 << 20));
}

#[test]
fn unknown_field_is_named_with_the_expected_ones() {
    let err = parse("node_name = \"a\"\nstatic_pods_dir = \"/x\"").unwrap_err().to_string();
    assert!(err.contains("static_pods_dir"), "{err}");
    assert!(err.contains("static_pod_dir"), "hint should list valid fields: {err}");
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn bad_values_name_the_field() {
    let err = parse("node_name = \"Bad_Name\"").unwrap_err().to_string();
    assert!(err.contains("node_name"), "{err}");
    let err =
        parse("node_name = \"a\"\n[runtime]\ndefault_memory_limit = \"12 parsecs\"").unwrap_err().to_string();
    assert!(err.contains("default_memory_limit") && err.contains("unknown suffix"), "{err}");
    let err = parse("node_name = \"a\"\nmax_pods = 0").unwrap_err().to_string();
    assert!(err.contains("max_pods"), "{err}");
    let err = parse("node_name = \"a\"\n[log]\nlevel = \"lichen=[\"").unwrap_err().to_string();
    assert!(err.contains("log.level"), "{err}");
}

#[test]
fn node_labels_and_taints_are_checked_like_the_api_server_would() {
    let err = parse("node_name = \"a\"\n[node_labels]\n\"node-role.kubernetes.io/edge\" = \"\"")
        .unwrap_err()
        .to_string();
    assert!(err.contains("node_labels") && err.contains("kubectl label node"), "{err}");
    let err =
        parse("node_name = \"a\"\n[node_labels]\n\"kubernetes.io/foo\" = \"x\"").unwrap_err().to_string();
    assert!(err.contains("NodeRestriction"), "{err}");
    parse("node_name = \"a\"\n[node_labels]\n\"topology.kubernetes.io/zone\" = \"barn-3\"\n\"acme.io/site\" = \"x\"")
        .expect("allowed labels");
    let err = parse("node_name = \"a\"\nnode_taints = [\"x=y:Sometimes\"]").unwrap_err().to_string();
    assert!(err.contains("node_taints") && err.contains("NoSchedule"), "{err}");
    let c = parse("node_name = \"a\"\nnode_taints = [\"edge:NoExecute\"]").expect("valid");
    assert_eq!(c.node_taints[0].effect, TaintEffect::NoExecute);
    assert_eq!(parse("node_name = \"a\"").expect("valid").node_taints[0].to_string(), DEFAULT_TAINT);
    assert!(parse("node_name = \"a\"\nnode_ip = \"pi.local\"").is_err());
}

#[test]
fn mqtt_is_off_by_default_and_checked_when_on() {
    let c = parse("node_name = \"pi-07\"").expect("valid");
    assert!(!c.mqtt.enabled());
    assert_eq!((c.mqtt.spool_flush_ms, c.mqtt.inflight, c.mqtt.pod_rate_limit), (5, 100, 100));
    assert_eq!(c.mqtt.spool_max_bytes, ByteSize(64 << 20));
    let c =
        parse("node_name = \"pi-07\"\n[mqtt]\nbroker = \"mqtt://b\"\nca_file = \"ca.pem\"").expect("valid");
    assert_eq!(c.mqtt.client_id, "pi-07", "the client id defaults to the node name");
    assert_eq!(c.mqtt.ca_file, Path::new("/etc/lichen/ca.pem"), "relative to the file");
    for (bad, field) in [
        ("broker = \"http://b\"", "mqtt.broker"),
        ("broker = \"mqtt://b\"\nclient_cert_file = \"/c.pem\"", "mqtt.client_cert_file"),
        ("broker = \"mqtt://b\"\nspool_flush_ms = 0", "mqtt.spool_flush_ms"),
        ("broker = \"mqtt://b\"\ntelemetry_qos = 2", "mqtt.telemetry_qos"),
        ("broker = \"mqtt://b\"\nmax_payload = \"32Mi\"", "mqtt.max_payload"),
    ] {
        let err = parse(&format!("node_name = \"a\"\n[mqtt]\n{bad}")).unwrap_err().to_string();
        assert!(err.contains(field), "{bad}: {err}");
    }
    let mut c =
        AgentConfig::from_toml("node_name = \"a\"", Path::new("/etc/lichen/config.toml")).expect("valid");
    let args = ConfigArgs {
        mqtt_broker: Some(parse_broker_arg("mqtts://b:8884").expect("a broker URL")),
        mqtt_inflight: Some(7),
        ..Default::default()
    };
    args.apply(&mut c).expect("flags apply");
    c.finish().expect("valid");
    assert_eq!((c.mqtt.broker.as_ref().map(BrokerUrl::as_str), c.mqtt.inflight), (Some("mqtts://b:8884"), 7));
}

#[test]
fn join_is_off_by_default_checked_when_on_and_never_shows_the_token() {
    let c = parse("node_name = \"pi-07\"").expect("valid");
    assert!(!c.join.enabled() && c.cluster().is_none(), "standalone");
    let c = parse(
        "node_name = \"pi-07\"\n[join]\nserver = \"https://10.0.0.1:6443\"\nca_cert = \"ca.crt\"\n\
         token = \"abcdef.0123456789abcdef\"",
    )
    .expect("valid");
    assert_eq!(c.join.ca_cert, Path::new("/etc/lichen/ca.crt"), "relative to the file");
    assert_eq!(c.join.token_file, Path::new("/var/lib/lichen/bootstrap-token"), "under state_dir");
    assert_eq!(c.cluster(), Some(PathBuf::from("/var/lib/lichen/node.kubeconfig")));
    assert!(!c.to_toml().contains("0123456789abcdef") && !format!("{c:?}").contains("0123456789abcdef"));
    for (bad, field) in [
        ("server = \"http://10.0.0.1:6443\"\nca_cert = \"/c\"", "join.server"),
        ("server = \"https://10.0.0.1:6443\"", "join.ca_cert"),
        ("server = \"https://a\"\nca_cert = \"/c\"\ntoken = \"nope\"", "join.token"),
    ] {
        let err = parse(&format!("node_name = \"a\"\n[join]\n{bad}")).unwrap_err().to_string();
        assert!(err.contains(field), "{bad}: {err}");
        assert!(!err.contains("nope"), "the token is not repeated: {err}");
    }
}

#[test]
fn gateway_mappings_parse_from_the_file_and_a_flag_and_bad_ones_are_named() {
    let c = parse(
        "node_name = \"pi-07\"\n[mqtt]\nbroker = \"mqtt://up\"\n[mqtt.gateway]\nlocal_broker = \"mqtt://127.0.0.1\"\n\
         mappings = [{ local = \"sensors/#\", upstream_prefix = \"site1/\", direction = \"both\" }, { local = \"cmd/#\" }]",
    )
    .expect("valid");
    let g = &c.mqtt.gateway;
    assert_eq!(g.client_id, "pi-07-gateway");
    assert_eq!(g.down_spool_max_bytes, ByteSize(16 << 20));
    assert_eq!(g.mappings[0].upstream_filter(), "site1/sensors/#");
    assert!(g.mappings[0].up() && g.mappings[0].down());
    assert_eq!((g.mappings[1].direction, g.mappings[1].upstream_prefix.as_str()), (GatewayDirection::Up, ""));
    let flag = parse_mappings("[{ local = \"a/#\", upstream_prefix = \"x/\", direction = \"down\" }]")
        .expect("flag");
    assert_eq!(flag.0[0].direction, GatewayDirection::Down);
    assert!(parse_mappings("[{ local = \"a\", direction = \"sideways\" }]").is_err());
    for (bad, field) in [
        (
            "[mqtt.gateway]\nlocal_broker = \"mqtt://l\"\nmappings = [{ local = \"a\" }]",
            "mqtt.gateway.local_broker",
        ),
        (
            "[mqtt]\nbroker = \"mqtt://u\"\n[mqtt.gateway]\nlocal_broker = \"mqtt://l\"",
            "mqtt.gateway.mappings",
        ),
        (
            "[mqtt]\nbroker = \"mqtt://u\"\n[mqtt.gateway]\nlocal_broker = \"mqtt://l\"\nmappings = [{ local = \"#\", upstream_prefix = \"site1\" }]",
            "end the prefix with '/'",
        ),
        (
            "[mqtt]\nbroker = \"mqtt://u\"\n[mqtt.gateway]\nlocal_broker = \"mqtt://l\"\nmappings = [{ local = \"a/#/b\" }]",
            "not a valid filter",
        ),
        (
            "[mqtt]\nbroker = \"mqtt://u\"\n[mqtt.gateway]\nlocal_broker = \"mqtt://l\"\ndown_spool_max_bytes = \"4Ki\"\nmappings = [{ local = \"a\" }]",
            "mqtt.gateway.down_spool_max_bytes",
        ),
        (
            "[mqtt]\nbroker = \"mqtt://u\"\n[mqtt.gateway]\nlocal_broker = \"mqtt://l\"\ndown_queue = 1000\nmappings = [{ local = \"a\" }]",
            "down_queue",
        ),
    ] {
        let err = parse(&format!("node_name = \"a\"\n{bad}")).unwrap_err().to_string();
        assert!(err.contains(field), "{bad}: {err}");
    }
}

#[test]
fn relative_paths_follow_the_file_and_flags_win() {
    let mut c = AgentConfig::from_toml("static_pod_dir = \"pods\"", Path::new("/opt/demo/lichen.toml"))
        .expect("valid");
    assert_eq!(c.static_pod_dir, Path::new("/opt/demo/pods"));
    let args = ConfigArgs {
        node_name: Some("edge-1".into()),
        max_pods: Some(7),
        default_fuel: Some(99),
        ..Default::default()
    };
    args.apply(&mut c).expect("flags apply");
    c.finish().expect("valid");
    assert_eq!((c.node_name.as_str(), c.max_pods, c.runtime.default_fuel), ("edge-1", 7, 99));
}

#[test]
fn allowed_host_paths_follow_the_file_and_are_never_the_state_dir() {
    let text = "node_name = \"a\"\n[runtime]\nallowed_host_paths = [\"data\", \"/srv/shared\"]";
    let mut c = AgentConfig::from_toml(text, Path::new("/opt/demo/lichen.toml")).expect("valid");
    c.finish().expect("valid");
    assert_eq!(c.runtime.allowed_host_paths, [Path::new("/opt/demo/data"), Path::new("/srv/shared")]);
    let default = parse("node_name = \"a\"").expect("valid");
    assert!(default.runtime.allowed_host_paths.is_empty(), "none by default");

    for (bad, why) in [
        ("allowed_host_paths = [\"/srv/../var/lib/lichen\"]", "without `..`"),
        ("allowed_host_paths = [\"/var/lib/lichen\"]", "under state_dir"),
        ("allowed_host_paths = [\"/var/lib/lichen/pods\"]", "under state_dir"),
    ] {
        let err = parse(&format!("node_name = \"a\"\n[runtime]\n{bad}")).unwrap_err().to_string();
        assert!(err.contains("runtime.allowed_host_paths") && err.contains(why), "{bad}: {err}");
    }
    // Flags are taken as given: a relative one is refused rather than guessed at.
    let mut c = parse("node_name = \"a\"").expect("valid");
    let args = ConfigArgs { allowed_host_paths: Some(vec!["data".into()]), ..Default::default() };
    args.apply(&mut c).expect("flags apply");
    let err = c.finish().unwrap_err().to_string();
    assert!(err.contains("runtime.allowed_host_paths") && err.contains("absolute"), "{err}");
}

#[test]
fn every_flag_lands_on_its_field_typed() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: ConfigArgs,
    }
    let cli = Cli::try_parse_from([
        "lichen",
        "--node-labels",
        "acme.io/site=barn-3,,zone=z",
        "--node-taints",
        "edge:NoExecute",
        "--mqtt-broker",
        "mqtt://b:1884",
        "--mqtt-gateway-local-broker",
        "",
        "--mqtt-gateway-mappings",
        "[{ local = \"s/#\" }]",
        "--container-log-max-size",
        "1Mi",
    ])
    .expect("flags parse");
    let mut c = parse("node_name = \"a\"\nnode_labels = { old = \"x\" }").expect("valid");
    cli.config.apply(&mut c).expect("flags apply");
    c.finish().expect("valid");
    let labels: Vec<_> = c.node_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    assert_eq!(labels, ["acme.io/site=barn-3", "zone=z"], "the flag replaces the file's labels");
    assert_eq!(c.node_taints.iter().map(ToString::to_string).collect::<Vec<_>>(), ["edge:NoExecute"]);
    assert_eq!(c.mqtt.broker.as_ref().map(BrokerUrl::as_str), Some("mqtt://b:1884"));
    assert!(!c.mqtt.gateway.enabled(), "an empty broker flag turns the gateway off");
    assert_eq!(c.mqtt.gateway.mappings.len(), 1);
    assert_eq!(c.container_logs.max_size, ByteSize(1 << 20));

    let err = Cli::try_parse_from(["lichen", "--node-labels", "nokey"]).err().expect("refused").to_string();
    assert!(err.contains("\"nokey\" is not key=value"), "{err}");
    let err = Cli::try_parse_from(["lichen", "--node-taints", "x=y"]).err().expect("refused").to_string();
    assert!(err.contains("has no effect"), "{err}");
}

#[test]
fn the_environment_token_is_parsed_once_and_never_repeated() {
    let join = "node_name = \"a\"\n[join]\nserver = \"https://a\"\nca_cert = \"/c\"";
    let mut c = AgentConfig::from_toml(join, Path::new("/etc/lichen/config.toml")).expect("valid");
    let args = ConfigArgs { join_token: Some("abcdef.0123456789abcdef\n".into()), ..Default::default() };
    args.apply(&mut c).expect("a token");
    c.finish().expect("valid");
    assert_eq!(c.join.token().map(|t| t.id()), Some("abcdef"));
    let args = ConfigArgs { join_token: Some("secret-ish".into()), ..Default::default() };
    let err = args.apply(&mut c).expect_err("not a token").to_string();
    assert!(err.contains("join.token") && !err.contains("secret-ish"), "{err}");
    let refused = format!("{join}\ntoken = \"secret-ish\"");
    let err = parse(&refused).expect_err("not a token").to_string();
    assert!(err.contains("join.token") && !err.contains("secret-ish"), "{err}");
}
