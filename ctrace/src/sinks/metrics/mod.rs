//! Prometheus metrics: the run's state (the kernel's exact totals per reason and netns, table fill, probes, what
//! was lost) and counts of the records an operator alerts on (module events, sysctl resets and writes), served at
//! `/metrics` by axum in the OpenMetrics or the Prometheus text format (whichever the scraper asks for), encoded
//! by the Prometheus project's Rust client. Labels are bounded: reason, netns (the kernel keeps a per-netns split
//! for a bounded number), module, action, sysctl key, probe; never a flow.

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{Router, http::header, response::IntoResponse, routing::get};
use prometheus_client::registry::Registry;

use super::Sink;
use crate::report::{Event, Status};

mod families;
#[cfg(test)]
mod tests;

use families::Exporter;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "cannot serve metrics on {addr}: {error}; is another ctrace or exporter using that port? Choose another \
         with --metrics ADDR:PORT"
    )]
    Bind { addr: SocketAddr, error: io::Error },
}

/// What the endpoint shows: the last status and the record counts.
#[derive(Debug, Default)]
struct State {
    status: Option<Status>,
    /// (module, action) → events.
    module_events: BTreeMap<(String, &'static str), u64>,
    sysctl_resets: BTreeMap<String, u64>,
    sysctl_writes: BTreeMap<String, u64>,
}

/// The modules and actions whose series exist from the start (at 0), so that `increase()` sees the first event.
const ACTIONS: [&str; 3] = ["load", "unload", "unload_failed"];

pub struct MetricsSink {
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
    /// Where it is served (the port chosen, when 0 was asked for).
    pub addr: SocketAddr,
}

impl MetricsSink {
    /// Binds `addr` now (a taken port fails before anything is attached) and serves from the current runtime.
    pub async fn bind(addr: SocketAddr) -> Result<MetricsSink, MetricsError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|error| MetricsError::Bind { addr, error })?;
        let addr = listener
            .local_addr()
            .map_err(|error| MetricsError::Bind { addr, error })?;
        let mut state = State::default();
        for action in ACTIONS {
            state.module_events.insert(("nf_conntrack".to_owned(), action), 0);
        }
        let state = Arc::new(Mutex::new(state));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Exporter(state.clone())));
        let registry = Arc::new(registry);
        let app = Router::new()
            .route(
                "/metrics",
                get(move |headers: axum::http::HeaderMap| scrape(registry.clone(), headers)),
            )
            .route("/", get(|| async { "ctrace: metrics at /metrics\n" }));
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                log::warn!("the metrics endpoint stopped: {e}");
            }
        });
        Ok(MetricsSink { state, server, addr })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for MetricsSink {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Sink for MetricsSink {
    fn record(&mut self, event: &Event) -> io::Result<()> {
        let mut state = self.state();
        match event {
            Event::Module(m) => {
                let action = ACTIONS.into_iter().find(|a| *a == m.action).unwrap_or("other");
                *state.module_events.entry((m.name.clone(), action)).or_default() += 1;
            }
            Event::SysctlReset(r) => *state.sysctl_resets.entry(r.key.clone()).or_default() += 1,
            Event::SysctlWrite(w) => *state.sysctl_writes.entry(w.key.clone()).or_default() += 1,
            _ => {}
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn wants_status(&self) -> bool {
        true
    }

    fn status(&mut self, status: &Status) {
        self.state().status = Some(status.clone());
    }
}

/// One scrape: the format the scraper prefers.
async fn scrape(registry: Arc<Registry>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    let mut body = String::new();
    let (result, content_type) = if openmetrics {
        (
            prometheus_client::encoding::text::encode(&mut body, &registry),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            prometheus_client::encoding::prometheus_text::encode(&mut body, &registry),
            "text/plain; version=0.0.4; charset=utf-8",
        )
    };
    match result {
        Ok(()) => ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        Err(_) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics\n",
        )
            .into_response(),
    }
}
