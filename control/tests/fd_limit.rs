//! Control out of file descriptors: a failed accept backs off (10 ms doubling to 1 s) instead of
//! spinning, the admin socket still answers, and the soft limit is raised to the hard one. The test lowers RLIMIT_NOFILE and fills the
//! descriptor table of this whole process, so it has a test binary of its own.

mod common;

use std::time::Duration;

use common::{Server, wait_until};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use warren_control::listen::MAX_ACCEPT_BACKOFF;
use warren_proto::control::ListUsersRequest;

/// Opens files until the process has no descriptor left.
fn fill_descriptors() -> Vec<std::fs::File> {
    let mut files = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => files.push(f),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::MFILE.raw_os_error()) => {
                return files;
            }
            Err(e) => panic!("opening /dev/null: {e}"),
        }
    }
}

#[tokio::test]
async fn out_of_descriptors_accept_backs_off_and_the_admin_socket_answers() {
    let limit = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(256),
            maximum: limit.maximum,
        },
    )
    .expect("lower the soft limit");
    let server = Server::start().await;
    let mut admin = server.local_admin().await;
    admin.list_users(ListUsersRequest {}).await.expect("served");
    drop(admin);
    // Its descriptor in the server is closed too before the table is filled.
    wait_until("the admin connection is closed", || {
        server.stats.admin.open() == 0
    })
    .await;

    // Every descriptor taken but one, which the client's socket takes: the server cannot
    // accept the connection waiting in its queue.
    let mut files = fill_descriptors();
    drop(files.pop());
    let client = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("the kernel completes the connect");

    // Without a backoff the accept loop fails tens of thousands of times a second; with it,
    // the pause doubles from 10 ms and reaches 1 s after 8 failures.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while server.stats.tcp.backoff() < MAX_ACCEPT_BACKOFF {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no backoff after {} failed accepts",
            server.stats.tcp.errors()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let errors = server.stats.tcp.errors();
    assert!(
        (8..=10).contains(&errors),
        "{errors} failed accepts until the pause reached 1 s"
    );
    assert_eq!(server.stats.tcp.accepted(), 0);

    // The admin socket: one descriptor for the operator's client; the server takes the
    // connection with the spare descriptor it keeps.
    drop(files.pop());
    let mut admin = server.local_admin().await;
    tokio::time::timeout(
        Duration::from_secs(10),
        admin.list_users(ListUsersRequest {}),
    )
    .await
    .expect("the admin socket answers in time")
    .expect("the admin socket answers out of descriptors");
    assert_eq!(server.stats.admin.spare_used(), 1);

    // Descriptors free again: the waiting connection is taken at the next try.
    drop(files);
    wait_until("the waiting TCP connection is accepted", || {
        server.stats.tcp.accepted() == 1
    })
    .await;
    assert_eq!(server.stats.tcp.backoff(), Duration::ZERO);
    drop((admin, client));
    server.stop().await;

    // At start the server raises the soft limit to the hard one.
    let raised = warren_control::listen::raise_nofile_limit().expect("raise");
    if let Some(hard) = limit.maximum {
        assert_eq!(raised, Some(hard));
    }
    assert_eq!(getrlimit(Resource::Nofile).current, raised);
}
