//! The DNS server: hickory-server over UDP and TCP on `--dns ADDR`, bound in the node's
//! network namespace (`--host-netns`), where pods reach the node; answers come from the
//! [`Zone`] the agent's syncs keep.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use hickory_server::{
    Server,
    net::runtime::Time,
    proto::{
        op::{Edns, Header, HeaderCounts, Message, Metadata, OpCode, ResponseCode},
        rr::Name,
    },
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};
use prometheus_client::metrics::{counter::Counter, family::Family};

use super::{Answer, Zone};
use crate::{metrics::DnsLabels, netns};

/// How long a query forwarded to `--dns-upstream` may take before it is answered SERVFAIL.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// A TCP client that sends nothing for this long is dropped.
const TCP_IDLE: Duration = Duration::from_secs(5);
/// The buffer of responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("--dns {addr}: binding in the node's network namespace {netns}: {source}")]
    Bind {
        addr: SocketAddr,
        netns: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("--dns {1}: {0}")]
    Netns(#[source] netns::NetnsError, SocketAddr),
    #[error("serving DNS: {source}")]
    Runtime { source: std::io::Error },
}

/// Answers queries from `zone`, and forwards those for names outside it to `upstream`
/// when there is one; counts them by response code.
struct ZoneHandler {
    zone: Arc<RwLock<Zone>>,
    upstream: Option<SocketAddr>,
    queries: Family<DnsLabels, Counter>,
}

/// Why a forwarded query got no answer.
#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within {UPSTREAM_TIMEOUT:?}")]
    Timeout,
    #[error("answer not DNS: {0}")]
    Decode(String),
    #[error("answer to another query (id {0})")]
    OtherId(u16),
}

/// Sends `query` (a whole DNS message) to `upstream` over UDP and reads its answer.
async fn ask_upstream(
    upstream: SocketAddr,
    query: &[u8],
    id: u16,
) -> Result<Message, UpstreamError> {
    let any: SocketAddr = if upstream.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(any).await?;
    // Connected: an unreachable upstream is an error at once, and only it can answer.
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buffer = vec![0u8; 65_535];
    let len = tokio::time::timeout(UPSTREAM_TIMEOUT, socket.recv(&mut buffer))
        .await
        .map_err(|_| UpstreamError::Timeout)??;
    let answer = Message::from_vec(buffer.get(..len).unwrap_or_default())
        .map_err(|e| UpstreamError::Decode(e.to_string()))?;
    if answer.metadata.id != id {
        return Err(UpstreamError::OtherId(answer.metadata.id));
    }
    Ok(answer)
}

#[async_trait::async_trait]
impl RequestHandler for ZoneHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        // Only plain queries of one question are answered; the rest is refused as a
        // name server refuses what it does not do.
        let info = match request.request_info() {
            Ok(info) if request.metadata.op_code == OpCode::Query => Some(info),
            _ => None,
        };
        let answer = match &info {
            Some(info) => {
                let name = Name::from(info.query.name());
                let zone = self.zone.read().unwrap_or_else(PoisonError::into_inner);
                zone.answer(&name, info.query.query_type())
            }
            None => Answer::NotOurs,
        };
        if let (Answer::NotOurs, Some(_), Some(upstream)) = (&answer, &info, self.upstream) {
            return self.forward(request, upstream, response_handle).await;
        }
        let records = match answer {
            Answer::Records(records) => {
                metadata.authoritative = true;
                metadata.response_code = ResponseCode::NoError;
                records
            }
            Answer::NxDomain => {
                metadata.authoritative = true;
                metadata.response_code = ResponseCode::NXDomain;
                Vec::new()
            }
            Answer::NotOurs => {
                metadata.response_code = if info.is_some() {
                    ResponseCode::Refused
                } else {
                    ResponseCode::NotImp
                };
                Vec::new()
            }
        };
        self.queries
            .get_or_create(&DnsLabels {
                rcode: rcode_label(metadata.response_code),
            })
            .inc();
        // EDNS answered with EDNS, so that a big answer over UDP fits the client's buffer
        // (hickory truncates, with TC set, past it, and past 512 bytes without EDNS).
        let edns = request.edns.as_ref().map(|asked| {
            let mut edns = Edns::new();
            edns.set_max_payload(asked.max_payload().max(512));
            edns
        });
        let mut builder = builder;
        if let Some(edns) = &edns {
            builder.edns(edns);
        }
        let response = builder.build(metadata, records.iter(), [], [], []);
        sent(request, response_handle.send_response(response).await)
    }
}

impl ZoneHandler {
    /// Relays `request` to `upstream` and its answer back (SERVFAIL without one).
    async fn forward<R: ResponseHandler>(
        &self,
        request: &Request,
        upstream: SocketAddr,
        mut response_handle: R,
    ) -> ResponseInfo {
        let answer = ask_upstream(upstream, request.as_slice(), request.metadata.id).await;
        let builder = MessageResponseBuilder::from_message_request(request);
        let count = |code| {
            self.queries
                .get_or_create(&DnsLabels {
                    rcode: rcode_label(code),
                })
                .inc();
        };
        match answer {
            Ok(answer) => {
                count(answer.metadata.response_code);
                let response = builder.build(
                    answer.metadata,
                    answer.answers.iter(),
                    answer.authorities.iter(),
                    [],
                    answer.additionals.iter(),
                );
                sent(request, response_handle.send_response(response).await)
            }
            Err(error) => {
                tracing::debug!(%upstream, %error, "DNS query forwarded without an answer");
                count(ResponseCode::ServFail);
                let response = builder.error_msg(&request.metadata, ResponseCode::ServFail);
                sent(request, response_handle.send_response(response).await)
            }
        }
    }
}

/// What was sent, or SERVFAIL if nothing could be.
fn sent(
    request: &Request,
    result: Result<ResponseInfo, hickory_server::net::NetError>,
) -> ResponseInfo {
    result.unwrap_or_else(|error| {
        tracing::debug!(%error, "DNS answer not sent");
        let mut failed = Metadata::response_from_request(&request.metadata);
        failed.response_code = ResponseCode::ServFail;
        ResponseInfo::from(Header {
            metadata: failed,
            counts: HeaderCounts::default(),
        })
    })
}

fn rcode_label(code: ResponseCode) -> &'static str {
    match code {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::FormErr => "FORMERR",
        _ => "SERVFAIL",
    }
}

/// The DNS sockets, bound and not yet served.
pub struct Sockets {
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
}

/// Binds `addr` (UDP and TCP) in the network namespace `host_netns`, where the node's pods
/// reach it.
pub fn bind(addr: SocketAddr, host_netns: &Path) -> Result<Sockets, DnsError> {
    let bind_error = |source| DnsError::Bind {
        addr,
        netns: host_netns.to_owned(),
        source,
    };
    // Sockets keep the namespace they were made in.
    let (udp, tcp) = netns::inside(host_netns, || {
        Ok((
            std::net::UdpSocket::bind(addr),
            std::net::TcpListener::bind(addr),
        ))
    })
    .map_err(|e| DnsError::Netns(e, addr))?;
    let (udp, tcp) = (udp.map_err(bind_error)?, tcp.map_err(bind_error)?);
    udp.set_nonblocking(true).map_err(bind_error)?;
    tcp.set_nonblocking(true).map_err(bind_error)?;
    Ok(Sockets { udp, tcp })
}

/// Serves `zone` on `sockets` on this tokio runtime until the returned server is dropped,
/// forwarding names outside it to `upstream` if given (refused otherwise).
pub fn serve(
    sockets: Sockets,
    zone: Arc<RwLock<Zone>>,
    upstream: Option<SocketAddr>,
    queries: Family<DnsLabels, Counter>,
) -> Result<Server<impl RequestHandler>, DnsError> {
    let tokio_error = |source| DnsError::Runtime { source };
    let udp = tokio::net::UdpSocket::from_std(sockets.udp).map_err(tokio_error)?;
    let tcp = tokio::net::TcpListener::from_std(sockets.tcp).map_err(tokio_error)?;
    let mut server = Server::new(ZoneHandler {
        zone,
        upstream,
        queries,
    });
    server.register_socket(udp);
    server.register_listener(tcp, TCP_IDLE, TCP_RESPONSE_BUFFER);
    Ok(server)
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        str::FromStr as _,
    };

    use hickory_server::proto::{
        op::{MessageType, Query},
        rr::RecordType,
    };

    use super::*;
    use crate::{dns::ServiceRecords, model::ObjectRef};

    /// A headless Service `many` in `default` with `count` ready endpoints.
    fn zone_with_headless(count: u8) -> Zone {
        let endpoints: Vec<String> = (1..=count)
            .map(|i| format!("{{addresses: [10.244.1.{i}]}}"))
            .collect();
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: many}}\nspec: {{clusterIP: None, ports: [{{port: 80}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: many-1, labels: {{kubernetes.io/service-name: many}}}}\n\
             addressType: IPv4\nendpoints: [{}]\nports: [{{port: 80}}]\n",
            endpoints.join(", ")
        );
        let (services, slices) = crate::model::load(&yaml);
        let slices: Vec<Arc<crate::model::SliceModel>> = slices.into_iter().map(Arc::new).collect();
        let refs: Vec<_> = slices.iter().collect();
        let mut zone = Zone::new("cluster.local").unwrap();
        zone.update(
            &ObjectRef::new("default", "many"),
            ServiceRecords::of(&services[0], &refs),
        );
        zone
    }

    fn query(name: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
        let mut message = Message::new(7, MessageType::Query, OpCode::Query);
        message.add_query(Query::query(Name::from_str(name).unwrap(), qtype));
        if edns {
            let mut edns = Edns::new();
            edns.set_max_payload(4096);
            message.set_edns(edns);
        }
        message.to_vec().unwrap()
    }

    /// The server on loopback ports of its own, answering from a zone of one headless
    /// Service with 60 endpoints: an A answer of 60 records is over 512 bytes.
    #[tokio::test]
    async fn answers_over_udp_and_tcp_truncated_past_512_bytes_without_edns() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
        udp.set_nonblocking(true).unwrap();
        tcp.set_nonblocking(true).unwrap();
        let queries = Family::<DnsLabels, Counter>::default();
        let zone = Arc::new(RwLock::new(zone_with_headless(60)));
        let _server = serve(Sockets { udp, tcp }, zone, None, queries.clone()).unwrap();

        let ask_udp = |packet: Vec<u8>| {
            tokio::task::spawn_blocking(move || {
                let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                client
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                client.send_to(&packet, udp_addr).unwrap();
                let mut buffer = [0u8; 65_535];
                let len = client.recv(&mut buffer).unwrap();
                (len, Message::from_vec(&buffer[..len]).unwrap())
            })
        };
        let many = "many.default.svc.cluster.local.";
        let (len, plain) = ask_udp(query(many, RecordType::A, false)).await.unwrap();
        assert!(len <= 512, "{len}");
        assert!(plain.metadata.truncation, "{plain:?}");
        assert!(plain.metadata.authoritative);
        let (_, with_edns) = ask_udp(query(many, RecordType::A, true)).await.unwrap();
        assert!(!with_edns.metadata.truncation);
        assert_eq!(with_edns.answers.len(), 60);
        let (_, missing) = ask_udp(query(
            "none.default.svc.cluster.local.",
            RecordType::A,
            false,
        ))
        .await
        .unwrap();
        assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
        let (_, outside) = ask_udp(query("example.com.", RecordType::A, false))
            .await
            .unwrap();
        assert_eq!(outside.metadata.response_code, ResponseCode::Refused);

        // TCP: the whole answer, two-byte length first.
        let over_tcp = tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(tcp_addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let packet = query(many, RecordType::A, false);
            let len = u16::try_from(packet.len()).unwrap().to_be_bytes();
            stream.write_all(&[&len[..], &packet].concat()).unwrap();
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).unwrap();
            let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut answer).unwrap();
            Message::from_vec(&answer).unwrap()
        })
        .await
        .unwrap();
        assert!(!over_tcp.metadata.truncation);
        assert_eq!(over_tcp.answers.len(), 60);

        let count = |rcode| queries.get_or_create(&DnsLabels { rcode }).get();
        assert_eq!(count("NOERROR"), 3);
        assert_eq!(count("NXDOMAIN"), 1);
        assert_eq!(count("REFUSED"), 1);
    }

    /// Names outside the zone go to `--dns-upstream`, whose answer comes back under the
    /// client's query id; an upstream that does not answer gives SERVFAIL.
    #[tokio::test]
    async fn names_outside_the_zone_are_forwarded_upstream() {
        // A fake upstream on loopback: every query answered with 192.0.2.1.
        let upstream = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        upstream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let fake = std::thread::spawn(move || {
            let mut buffer = [0u8; 1500];
            let (len, from) = upstream.recv_from(&mut buffer).unwrap();
            let asked = Message::from_vec(&buffer[..len]).unwrap();
            let mut answer = Message::new(asked.metadata.id, MessageType::Response, OpCode::Query);
            answer.metadata.recursion_available = true;
            let name = asked.queries[0].name().clone();
            answer.add_query(asked.queries[0].clone());
            answer
                .answers
                .push(hickory_server::proto::rr::Record::from_rdata(
                    name,
                    60,
                    hickory_server::proto::rr::RData::A(hickory_server::proto::rr::rdata::A(
                        std::net::Ipv4Addr::new(192, 0, 2, 1),
                    )),
                ));
            upstream.send_to(&answer.to_vec().unwrap(), from).unwrap();
        });
        // An upstream that is not there: its port is closed.
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);

        let ask = |upstream: SocketAddr| async move {
            let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = udp.local_addr().unwrap();
            udp.set_nonblocking(true).unwrap();
            tcp.set_nonblocking(true).unwrap();
            let queries = Family::<DnsLabels, Counter>::default();
            let zone = Arc::new(RwLock::new(Zone::new("cluster.local").unwrap()));
            let server = serve(Sockets { udp, tcp }, zone, Some(upstream), queries).unwrap();
            let answer = tokio::task::spawn_blocking(move || {
                let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                client
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                client
                    .send_to(&query("example.com.", RecordType::A, false), addr)
                    .unwrap();
                let mut buffer = [0u8; 1500];
                let len = client.recv(&mut buffer).unwrap();
                Message::from_vec(&buffer[..len]).unwrap()
            })
            .await
            .unwrap();
            drop(server);
            answer
        };
        let forwarded = ask(upstream_addr).await;
        fake.join().unwrap();
        assert_eq!(forwarded.metadata.id, 7);
        assert_eq!(forwarded.metadata.response_code, ResponseCode::NoError);
        assert_eq!(forwarded.answers.len(), 1);
        assert_eq!(forwarded.answers[0].data.to_string(), "192.0.2.1");
        let failed = ask(closed_addr).await;
        assert_eq!(failed.metadata.response_code, ResponseCode::ServFail);
    }
}
