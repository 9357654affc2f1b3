//! The certificates of members and registers close to their end. One that
//! expires shuts its agency out of the exchange (a member's lookups are
//! refused; a register's records cannot be fetched), so the operator hears
//! of it, in metrics and in the log, while there is time to issue a new one.

use std::collections::HashMap;
use std::sync::Mutex;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::state::Broker;

/// Warned of this long before a certificate expires (as the broker's own).
pub const EXPIRY_WARNING: time::Duration = time::Duration::days(30);

/// Members counted apart at most: enough for a national federation, and
/// bounded whatever certificates the CA signed.
const MAX_MEMBERS: usize = 10_000;

/// When the certificate each member last connected with expires.
#[derive(Default)]
pub struct MemberCertificates {
    last: Mutex<HashMap<String, OffsetDateTime>>,
}

impl MemberCertificates {
    /// `member` connected presenting a certificate valid until `not_after`.
    pub fn note(&self, member: &str, not_after: OffsetDateTime) {
        // Counts only, whole at every step: usable after a panic elsewhere.
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = last.get_mut(member) {
            *known = not_after;
        } else if last.len() < MAX_MEMBERS {
            last.insert(member.to_owned(), not_after);
        }
    }

    /// Every member seen, with its certificate's expiry.
    pub fn all(&self) -> Vec<(String, OffsetDateTime)> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.iter().map(|(member, t)| (member.clone(), *t)).collect()
    }
}

/// Logs a warning for each member and register endpoint whose certificate
/// (as last seen) expires within [`EXPIRY_WARNING`] of `now`, or expired;
/// how many it warned of.
pub fn warn_of_expiring(broker: &Broker, now: OffsetDateTime) -> usize {
    let soon = |t: &OffsetDateTime| *t - now <= EXPIRY_WARNING;
    let mut warned = 0;
    let mut members = broker.member_certificates.all();
    members.sort();
    for (member, not_after) in members.iter().filter(|(_, t)| soon(t)) {
        warned += 1;
        tracing::warn!(
            member = %member,
            not_after = %not_after.format(&Rfc3339).unwrap_or_default(),
            days_left = (*not_after - now).whole_days(),
            "a member's certificate expires soon, and then the broker refuses it: issue the member a new one \
             (`lienthong certs issue --member <id>`)"
        );
    }
    for (provider, endpoint) in broker.relay.endpoints() {
        let Some(not_after) = endpoint.certificate_not_after().filter(soon) else {
            continue;
        };
        warned += 1;
        tracing::warn!(
            provider = %provider,
            endpoint = %endpoint.id,
            not_after = %not_after.format(&Rfc3339).unwrap_or_default(),
            days_left = (not_after - now).whole_days(),
            "a register's certificate expires soon, and then the broker refuses to call it: issue the register a \
             new one (`lienthong certs issue --member <id> --host <name>`)"
        );
    }
    warned
}
