/** @odoo-module **/

import { _t } from '@web/core/l10n/translation';
import { rpc, RPCError } from '@web/core/network/rpc';

import paymentForm from '@payment/js/payment_form';

// A Kenyan mobile number in any usual form (07.., 01.., 7.., 254.., +254.., 00254.., +254 (0)7..);
// the server says which ranges are Safaricom's.
const MPESA_PHONE = /^(?:(?:\+|00)?254(?:\(0\))?|0)?[17]\d{8}$/;

paymentForm.include({

    // #=== DOM MANIPULATION ===#

    /**
     * Use the direct flow: the phone number is read from the inline form.
     *
     * @override method from @payment/js/payment_form
     */
    async _prepareInlineForm(providerId, providerCode, paymentOptionId, paymentMethodCode, flow) {
        if (providerCode !== 'mpesa') {
            this._super(...arguments);
            return;
        }
        this._setPaymentFlow('direct');
        const inlineForm = this._getInlineForm(document.querySelector('input[name="o_payment_radio"]:checked'));
        if (inlineForm && !inlineForm.dataset.mpesaPayFrom) {
            inlineForm.dataset.mpesaPayFrom = 'ready';
            inlineForm.querySelectorAll('input[name="o_mpesa_pay_from"]').forEach((choice) => {
                choice.addEventListener('change', () => this._mpesaShowPayFrom(inlineForm));
            });
        }
        this._mpesaShowPayFrom(inlineForm);
    },

    /**
     * Paid from the till, no phone is asked: the phone's field is hidden while the till is chosen.
     */
    _mpesaShowPayFrom(inlineForm) {
        const phoneBlock = inlineForm?.querySelector('[name="o_mpesa_phone_block"]');
        if (phoneBlock) {
            phoneBlock.classList.toggle('d-none', !!this._mpesaGetTill());
        }
    },

    // #=== PAYMENT FLOW ===#

    /**
     * Check the phone number before Odoo creates the transaction.
     *
     * @override method from @payment/js/payment_form
     */
    async _initiatePaymentFlow(providerCode, paymentOptionId, paymentMethodCode, flow) {
        if (providerCode !== 'mpesa') {
            await this._super(...arguments);
            return;
        }
        if (this._mpesaGetTill()) {
            await this._super(...arguments); // Paid from the till: no phone to check.
            return;
        }
        const input = this._mpesaGetPhoneInput();
        input.setCustomValidity('');
        if (!MPESA_PHONE.test(this._mpesaGetPhone())) {
            input.setCustomValidity(_t("Enter a Safaricom number, such as 0712 345 678."));
        }
        if (!input.reportValidity()) {
            this._enableButton(); // The submit button is disabled at this point, enable it.
            return;
        }
        await this._super(...arguments);
    },

    /**
     * Ask the server to send the STK Push, then follow the transaction on the status page.
     *
     * @override method from @payment/js/payment_form
     */
    async _processDirectFlow(providerCode, paymentOptionId, paymentMethodCode, processingValues) {
        if (providerCode !== 'mpesa') {
            this._super(...arguments);
            return;
        }
        try {
            const till = this._mpesaGetTill();
            const result = till ? await rpc('/payment/mpesa/till_push', {
                reference: processingValues.reference,
                till: till,
                access_token: processingValues.mpesa_access_token,
            }) : await rpc('/payment/mpesa/stk_push', {
                reference: processingValues.reference,
                phone: this._mpesaGetPhone(),
                access_token: processingValues.mpesa_access_token,
            });
            if (result.error) {
                this._displayErrorDialog(_t("M-Pesa payment not started"), result.error);
                this._enableButton();
                return;
            }
            window.location = '/payment/status';
        } catch (error) {
            if (error instanceof RPCError) {
                this._displayErrorDialog(_t("M-Pesa payment not started"), error.data.message);
                this._enableButton();
            } else {
                throw error;
            }
        }
    },

    // #=== GETTERS ===#

    _mpesaGetPhoneInput() {
        const radio = document.querySelector('input[name="o_payment_radio"]:checked');
        return this._getInlineForm(radio).querySelector('#o_mpesa_phone');
    },

    _mpesaGetPhone() {
        return this._mpesaGetPhoneInput().value.replace(/[\s\-.]/g, '');
    },

    /**
     * The till to pay from (B2B Express Checkout) when the distributor chose it, else null.
     */
    _mpesaGetTill() {
        const radio = document.querySelector('input[name="o_payment_radio"]:checked');
        const choice = this._getInlineForm(radio)?.querySelector('input[name="o_mpesa_pay_from"]:checked');
        return choice && choice.value === 'till' ? choice.dataset.till : null;
    },

});
