//! A thermostat-style module for Lichen using the `lichen:mqtt` host functions: it subscribes to
//! set points, and publishes a reading every second plus an acknowledgement of each set point.
//!
//! Pod annotations it needs (topics outside them are refused with `EACCES`):
//!
//! ```yaml
//! lichen.dev/mqtt-publish: "thermostat/{pod}"        # it publishes below this
//! lichen.dev/mqtt-subscribe: "thermostat/{pod}/set"  # and may subscribe within this
//! ```
//!
//! It learns its topics from the environment (`TOPIC`, set in the pod spec), so the same module
//! serves any pod.

mod lichen_mqtt;

use lichen_mqtt::Errno;

fn main() {
    let base = std::env::var("TOPIC").unwrap_or_else(|_| "thermostat/demo".into());
    match lichen_mqtt::subscribe(&format!("{base}/set")) {
        Ok(()) => {}
        Err(Errno::ACCES) => {
            eprintln!("{base}/set is not granted: check the pod's lichen.dev/mqtt-subscribe");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("subscribe: errno {}", e.0);
            std::process::exit(1);
        }
    }
    let mut set_point = 20.0f64;
    let mut reading = 18.0f64;
    loop {
        // Waiting here does not block the agent: the host awaits the message asynchronously.
        match lichen_mqtt::receive(1000) {
            Ok(m) => {
                if let Some(v) = std::str::from_utf8(&m.payload).ok().and_then(|t| t.trim().parse().ok()) {
                    eprintln!("set point {v} from {}", m.topic);
                    set_point = v;
                    let _ = lichen_mqtt::publish(&format!("{base}/ack"), format!("{v}").as_bytes(), 1, false);
                }
            }
            Err(Errno::AGAIN) => {}
            Err(e) => eprintln!("receive: errno {}", e.0),
        }
        reading += (set_point - reading) * 0.1;
        match lichen_mqtt::publish(&format!("{base}/reading"), format!("{reading:.2}").as_bytes(), 0, false) {
            // Rate limited or the broker away (QoS 0 is not spooled): skip this reading.
            Ok(()) | Err(Errno::AGAIN) | Err(Errno(53)) => {}
            Err(e) => eprintln!("publish: errno {}", e.0),
        }
    }
}
