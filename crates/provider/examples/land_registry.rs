use std::sync::Arc;

use lienthong_provider::{FetchContext, FetchError, ProviderConfig, RecordSource, serve};
use lienthong_tls::{ServerTls, TlsFiles, TlsMaterial};
use serde_json::{Value, json};

/// The register's database (here, one parcel).
struct LandRegister;

#[async_trait::async_trait]
impl RecordSource for LandRegister {
    fn record_types(&self) -> Vec<String> {
        vec!["land.parcel_owner".to_owned()]
    }

    async fn fetch(&self, ctx: FetchContext) -> Result<Value, FetchError> {
        let Some(national_id) = ctx.query["national_id"].as_str() else {
            return Err(FetchError::InvalidQuery("national_id must be a string".to_owned()));
        };
        // Bound the database call by the broker's deadline: a later answer is lost.
        let lookup = async { (national_id == "001084004217").then_some("HN-0042") };
        let found = match ctx.deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), lookup)
                .await
                .map_err(|_| FetchError::Unavailable("the database did not answer in time".to_owned()))?,
            None => lookup.await,
        };
        match found {
            // The whole record, valid against the record schema of ctx.schema_version.
            Some(parcel) => Ok(json!({ "national_id": national_id, "parcel": parcel })),
            // Never an empty object; never the national ID in a message.
            None => Err(FetchError::NotFound("no parcel for this subject".to_owned())),
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    lienthong_tls::install_crypto_provider();
    // Issued with `lienthong certs issue --member land-registry --host land.gov.example`.
    let files = TlsFiles {
        ca: "certs/ca.pem".into(),
        cert: "certs/land-registry.pem".into(),
        key: "certs/land-registry.key".into(),
    };
    let tls = Arc::new(ServerTls::new(&TlsMaterial::load(&files)?, "gov.example")?);
    let mut config = ProviderConfig::new("gov.example");
    config.member = Some("land-registry".to_owned());
    // Renewed files are taken without a restart.
    config.tls_files = Some(files);
    let listener = tokio::net::TcpListener::bind("0.0.0.0:9101").await?;
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    serve(Arc::new(LandRegister), tls, config, listener, shutdown).await?;
    Ok(())
}
