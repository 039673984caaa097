pub mod activate;
pub mod courier;
pub mod cyrus;
pub mod debroot;
pub mod dovecot;
pub mod fakeimap;
pub mod imapref;
pub mod pop3;
