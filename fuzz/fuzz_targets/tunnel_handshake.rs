//! The agent's side of the tunnel handshake against a hostile hub: the agent sends its
//! upgrade request, the "hub" answers with the fuzzer's bytes (a response head, maybe a
//! refusal body) and closes. Whatever comes back, `upgrade_over` returns (a tunnel or an
//! error) without panicking, and a refusal's message stays short and free of control
//! characters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use potluck_tunnel::upgrade::{upgrade_over, TunnelError, MAX_REFUSAL_MESSAGE_CHARS};
use potluck_tunnel::HubUrl;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let hub = HubUrl::parse("http://127.0.0.1:9").expect("a valid hub URL");
    let answer = data.to_vec();
    runtime().block_on(async {
        let (agent_end, mut hub_end) = tokio::io::duplex(64 * 1024);
        let fake_hub = async move {
            let mut request = [0u8; 4096];
            let _ = hub_end.read(&mut request).await;
            let _ = hub_end.write_all(&answer).await;
            let _ = hub_end.shutdown().await;
            hub_end
        };
        let (result, _hub_end) =
            tokio::join!(upgrade_over(agent_end, &hub, "pt-fuzz", "0.0.0", &[]), fake_hub);
        match result {
            Err(TunnelError::Refused { message, .. })
            | Err(TunnelError::Unauthorized { message, .. }) => {
                assert!(message.chars().count() <= MAX_REFUSAL_MESSAGE_CHARS);
                assert!(
                    !message.chars().any(char::is_control),
                    "control characters shown"
                );
            }
            Ok(_) | Err(_) => {}
        }
    });
});
