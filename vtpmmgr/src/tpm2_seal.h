/*
 * vtpmmgr persistence on TPM 2.0 hosts (docs/vtpmmgr-tpm2.md of xen-vtpm).
 *
 * Xen 4.17's TPM 2.0 path "binds" the manager's keys with an RSA key created
 * afresh at every boot, and group 0 never gets a seal configuration (those
 * come from GROUP_UPDATE, whose group needs a TPM 1.2 identity key), so the
 * manager never writes its disk.  Here, on a TPM 2.0:
 *
 *  - every seal entry of the disk (the root seal list and the group seal
 *    lists) holds a TPM 2.0 sealed data object under the SRK: TPM2B_PUBLIC
 *    then TPM2B_PRIVATE in sealed_data[256], the secrets of the sealed
 *    structure in the object, its public part in digest_at_seal (see
 *    tpm2_seal.c for why and how).  An entry with bit 31 of
 *    pcr_selection clear carries PolicyPCR over the selected sha256 PCRs at
 *    the values of this boot; an entry with bit 31 set carries
 *    PolicyAuthorize of a policy authority (an ECC P-256 key), so that a boot
 *    whose PolicyPCR digest the authority signed also opens the table;
 *  - group 0 is provisioned from the command line when the manager creates
 *    its table (tpm2_pcrs=, vtpm_label=, tpm2_authority=), replacing the
 *    signed GROUP_UPDATE of TPM 1.2;
 *  - a disk that holds a table this boot cannot open is never replaced by an
 *    empty one: the manager says why and stops.
 */
#ifndef VTPMMGR_TPM2_SEAL_H
#define VTPMMGR_TPM2_SEAL_H

#include "tcg.h"
#include "vtpm_disk.h"

/* pcr_selection bit 31: the entry opens by an authorized policy, not by the PCR values. */
#define TPM2_SEAL_AUTHORIZED (1u << 31)
/* What the authority signs with the PolicyPCR digest (TPM2_PolicyAuthorize policyRef). */
#define TPM2_SEAL_POLICY_REF "xen-vtpmmgr"

/* The tpm2_pcrs=, tpm2_authority=, tpm2_authorized= and vtpm_label= words; -1 if one is malformed. */
int tpm2_seal_parse_args(int argc, char **argv);

/* 1 if the command line asks for a persistent group 0 (tpm2_pcrs=). */
int tpm2_seal_provisioning_requested(void);

/* TPM_read_pcrs and TPM_pcr_digest on TPM 2.0: the sha256 bank, and a 20-byte digest of the
 * selected values (SHA-256 of their concatenation, cut to 20 bytes) for digest_release. */
void tpm2_seal_read_pcrs(void);
void tpm2_seal_pcr_digest(struct hash160 *buf, le32_t selection);

/* TPM2_disk_bind and TPM2_disk_unbind of a disk_root_sealed_data or disk_group_sealed_data; *size
 * is the size of the structure dst points to (which of the two is meant). */
TPM_RC tpm2_seal(struct disk_seal_entry *dst, const void *src, unsigned int size);
TPM_RC tpm2_unseal(void *dst, unsigned int *size, const struct disk_seal_entry *src);

/* 1 if the entry is worth trying although its digest_release differs from this boot's PCRs:
 * an authorized entry, and tpm2_authorized= was given. */
int tpm2_seal_by_authority(const struct disk_seal_entry *entry);

/* After vtpm_load_disk() failed: 1 if the disk holds no manager table (a first start); else
 * print what stopped it from opening and return 0. */
int tpm2_seal_disk_is_blank(void);

/* After a new table was created: provision group 0 from the command line and write the table.
 * 0 on success (also when nothing was asked: the manager then stays unprovisioned). */
int tpm2_seal_provision(void);

/* After the table loaded: if it opened only by the authority's approval, seal it to this boot's
 * PCRs and write it, so that the approval is no longer needed. */
int tpm2_seal_loaded(void);

#endif
