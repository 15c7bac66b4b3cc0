//! The generated code works end to end: a real tonic server and client on loopback exchange
//! Hello → Welcome, the bearer token arrives in the metadata, and a chunked result is acked.
#![allow(clippy::unwrap_used, reason = "tests")]

use lumos_agent_proto::v1::agent_message::Message as AgentMsg;
use lumos_agent_proto::v1::agent_tunnel_client::AgentTunnelClient;
use lumos_agent_proto::v1::agent_tunnel_server::{AgentTunnel, AgentTunnelServer};
use lumos_agent_proto::v1::cloud_message::Message as CloudMsg;
use lumos_agent_proto::v1::{
    AgentMessage, CallResult, CallStatus, CloudMessage, Hello, ResultAck, Welcome,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

/// Welcomes an agent with a session named after its id and token, then acks every last chunk.
struct Cloud;

#[tonic::async_trait]
impl AgentTunnel for Cloud {
    type ConnectStream = ReceiverStream<Result<CloudMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        if token != "Bearer agent-token" {
            return Err(Status::unauthenticated("bad agent token"));
        }
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            while let Some(Ok(message)) = inbound.next().await {
                let reply = match message.message {
                    Some(AgentMsg::Hello(hello)) => CloudMsg::Welcome(Welcome {
                        session_id: format!("session-of-{}", hello.agent_id),
                        heartbeat_interval_ms: 10_000,
                        max_chunk_size: 1 << 20,
                    }),
                    Some(AgentMsg::CallResult(result)) if result.last => {
                        CloudMsg::ResultAck(ResultAck {
                            call_id: result.call_id,
                        })
                    }
                    _ => continue,
                };
                if tx
                    .send(Ok(CloudMessage {
                        message: Some(reply),
                    }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn start_cloud() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentTunnelServer::new(Cloud))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

async fn open(
    url: &str,
    token: &str,
) -> (
    mpsc::Sender<AgentMessage>,
    Result<Streaming<CloudMessage>, Status>,
) {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = AgentTunnelClient::new(channel);
    let (tx, rx) = mpsc::channel(8);
    let mut request = Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    tx.send(AgentMessage {
        message: Some(AgentMsg::Hello(Hello {
            agent_id: "agent-1".into(),
            protocol_version: lumos_agent_proto::PROTOCOL_VERSION,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    (tx, client.connect(request).await.map(Response::into_inner))
}

#[tokio::test]
async fn hello_welcome_and_acked_results() {
    let url = start_cloud().await;
    let (tx, inbound) = open(&url, "agent-token").await;
    let mut inbound = inbound.unwrap();
    let welcome = inbound.next().await.unwrap().unwrap();
    let Some(CloudMsg::Welcome(welcome)) = welcome.message else {
        panic!("expected Welcome, got {welcome:?}")
    };
    assert_eq!(welcome.session_id, "session-of-agent-1");

    for (seq, last) in [(0, false), (1, true)] {
        let chunk = CallResult {
            call_id: "call-7".into(),
            seq,
            data: b"{}".to_vec().into(),
            last,
            status: CallStatus::ConnectorAnswered.into(),
        };
        tx.send(AgentMessage {
            message: Some(AgentMsg::CallResult(chunk)),
        })
        .await
        .unwrap();
    }
    let ack = inbound.next().await.unwrap().unwrap();
    assert_eq!(
        ack.message,
        Some(CloudMsg::ResultAck(ResultAck {
            call_id: "call-7".into()
        }))
    );
}

#[tokio::test]
async fn a_bad_token_is_unauthenticated() {
    let url = start_cloud().await;
    let (_tx, inbound) = open(&url, "stolen").await;
    assert_eq!(inbound.unwrap_err().code(), tonic::Code::Unauthenticated);
}

#[test]
fn the_contract_names_what_the_cloud_relies_on() {
    // Field and message names the issue fixes: a rename would break every cloud peer.
    for name in [
        "rpc Connect(stream AgentMessage) returns (stream CloudMessage)",
        "package lumos.agent.v1;",
        "string call_id = 1;",
        "bytes payload = 6;",
        "uint64 deadline_ms = 5;",
        "bytes data = 3;",
        "bool last = 4;",
        "uint64 revision = 1;",
        "string agent_id = 1;",
        "string cluster_id = 7;",
    ] {
        assert!(lumos_agent_proto::PROTO.contains(name), "{name}");
    }
}
