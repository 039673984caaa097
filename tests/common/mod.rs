pub mod activate;
pub mod dovecot;
pub mod fakeimap;
pub mod pop3;
